// Paging, filtering and sorting for large class counts; no network, no libraries.
(function () {
  "use strict";
  function toggle(buttonId, targetId, showText, hideText) {
    var b = document.getElementById(buttonId), t = document.getElementById(targetId);
    if (!b || !t) return;
    b.addEventListener("click", function () {
      var collapsed = t.classList.toggle("collapsed");
      b.textContent = collapsed ? showText : hideText;
    });
  }
  var tb = document.getElementById("toggle-classes");
  if (tb) toggle("toggle-classes", "class-table", tb.textContent, "Show the worst only");
  var gb = document.getElementById("toggle-galleries");
  if (gb) toggle("toggle-galleries", "gallery-list", gb.textContent, "Show the worst only");
  var sb = document.getElementById("toggle-sizes");
  if (sb) toggle("toggle-sizes", "size-table", sb.textContent, "Show the worst only");

  var filter = document.getElementById("class-filter"), table = document.getElementById("class-table");
  if (filter && table) {
    filter.addEventListener("input", function () {
      var q = filter.value.trim().toLowerCase();
      if (q) table.classList.remove("collapsed");
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        tr.classList.toggle("filtered", q !== "" && tr.getAttribute("data-name").indexOf(q) < 0);
      });
    });
  }
  document.querySelectorAll("table.sortable").forEach(function (t) {
    t.querySelectorAll("th[data-type]").forEach(function (th, col) {
      var dir = 1;
      th.addEventListener("click", function () {
        var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
        var num = th.getAttribute("data-type") === "num";
        t.classList.remove("collapsed");
        var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[idx].getAttribute("data-v"), y = b.cells[idx].getAttribute("data-v");
          return dir * (num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y));
        });
        dir = -dir;
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  // A link to a class gallery that is collapsed or closed: open it first.
  document.querySelectorAll('a[href^="#g"]').forEach(function (a) {
    a.addEventListener("click", function () {
      var d = document.getElementById(a.getAttribute("href").slice(1));
      if (!d) return;
      if (d.classList.contains("extra")) document.getElementById("gallery-list").classList.remove("collapsed");
      d.open = true;
    });
  });
})();
