#!/usr/bin/env bash
# CI: build docker/Dockerfile for real with podman and smoke-run the image, as a new user would.
#
#   docker/ci-smoke.sh            (as root; .ci/run calls it after the tests)
#
# 1. apt-installs podman, runc and debootstrap if missing.
# 2. Makes a local base (cached as $BASE_TAG): Debian bookworm by `debootstrap --variant=minbase` from the mirror
#    apt already uses, plus a uid/gid-1000 `ubuntu` user, so the Dockerfile meets what Ubuntu 24.04 bases have.
# 3. Builds the image (with the layer cache a rebuild after a code change takes ~30 s here), with the host's CA
#    bundle and a pip.conf naming it mounted read-only into the build only (HTTPS may pass a re-signing proxy).
# 4. Runs `--help`, then, with `--network none` (nothing is fetched at run time), writes a small built-in demo
#    dataset (`demo-data`, fewer images than `train` alone builds) and trains on it for one epoch, once as the
#    image's user (uid 1000) and once as `--user 4321:4321`, the run directory on a mounted volume, and checks
#    the run's files appear there with those owners.
# Exits non-zero, naming the step, on any failure. Needs ~8 GB free under /var/lib/containers.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${CONVNEXT_SMOKE_STATE:-/var/tmp/convnext-fast-ci}"   # containers.conf, pip.conf, scratch run dirs
IMAGE="${CONVNEXT_SMOKE_IMAGE:-localhost/convnext-fast:ci}"
SUITE=bookworm
BASE_TAG="localhost/convnext-fast-ci-base:$SUITE"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
OTHER_USER=4321:4321
# 21 classes x 12 train / 4 val images at 64 px: an epoch of 7 steps, seconds on a CPU (the full demo is minutes).
DEMO_ARGS=(--train-per-class 12 --val-per-class 4 --size 64)
START=$SECONDS

stamp() { local line; while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }
log() { printf '[docker-smoke %4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }

install_tools() {
    local missing=() cmd
    for cmd in podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [ ${#missing[@]} -eq 0 ] && return
    log "apt-get install ${missing[*]}"
    apt-get update -qq || die "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]}"
}

# podman as shipped does not start here: root cannot raise rlimits above the hard limits (podman's default
# ulimits do), and crun refuses hybrid cgroups v1+v2 (runc accepts them).
write_containers_conf() {
    local nofile nproc
    nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
    [ "$nofile" = unlimited ] && nofile=1048576
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    mkdir -p "$STATE"
    cat > "$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$STATE/containers.conf"
}

# apt_mirror [FILE...]: the first URI that apt's sources (default: sources.list, then sources.list.d/*.list and
# *.sources) give for $SUITE, one-line or deb822 format; deb.debian.org if none does.
apt_mirror() {
    local f uri
    [ $# -gt 0 ] || set -- /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
    for f in "$@"; do
        [ -r "$f" ] || continue
        case "$f" in
        *.sources) uri="$(awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { u = ""; deb = 0; ok = 0
              for (j = 1; j <= NF; j++) {
                if ($j ~ /^Types:/ && $j ~ /[ \t]deb([ \t]|$)/) deb = 1
                if ($j ~ /^URIs:/) { split(substr($j, 6), a, " "); u = a[1] }
                if ($j ~ /^Suites:/) { n = split(substr($j, 8), b, " "); for (k = 1; k <= n; k++) if (b[k] == s) ok = 1 }
                if ($j ~ /^Enabled:[ \t]*no/) deb = 0 }
              if (deb && ok && u != "") { print u; exit } }' "$f")" ;;
        *) uri="$(awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                                                  if ($(i + 1) == s) { print $i; exit } }' "$f")" ;;
        esac
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo http://deb.debian.org/debian
}

make_base() {
    if podman image exists "$BASE_TAG"; then log "base $BASE_TAG: cached"; return; fi
    local mirror rootfs
    mirror="${CONVNEXT_SMOKE_MIRROR:-$(apt_mirror)}"
    rootfs="$(mktemp -d "$STATE/rootfs.XXXXXX")"
    log "base $BASE_TAG: debootstrap --variant=minbase $SUITE from $mirror"
    # passwd (useradd, usermod) is in every Ubuntu and Debian image, but not in minbase.
    debootstrap --variant=minbase --include=passwd "$SUITE" "$rootfs" "$mirror" > "$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; die "debootstrap (log: $STATE/debootstrap.log)"; }
    chroot "$rootfs" useradd --uid 1000 --user-group --create-home --shell /bin/bash ubuntu || die "useradd ubuntu"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null || die "podman import"
    rm -rf --one-file-system "$rootfs"
}

build_image() {
    local old new t0=$SECONDS
    old="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    # One directory mount that pip reads as site config: the only trace it leaves in the image is the empty
    # mountpoint /etc/xdg/pip (file mounts leave empty /etc/pip.conf-like files behind).
    rm -rf "$STATE/pip"; mkdir -p "$STATE/pip"
    if [ -r "$HOST_CA" ]; then
        cp "$HOST_CA" "$STATE/pip/host-ca.crt"
        printf '[global]\ncert = /etc/xdg/pip/host-ca.crt\n' > "$STATE/pip/pip.conf"
    fi
    local mounts=(-v "$STATE/pip:/etc/xdg/pip:ro")
    log "podman build $IMAGE (base $BASE_TAG; log: $STATE/build.log)"
    podman build --pull=never --layers -f "$ROOT/docker/Dockerfile" -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_TAG" \
        "${mounts[@]}" "$ROOT" 2>&1 | stamp > "$STATE/build.log" || { tail -30 "$STATE/build.log" >&2; die "podman build"; }
    new="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
    log "built in $((SECONDS - t0)) s: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
    # The previous image, untagged by this build, and its own layers; the layers still in use stay (the cache).
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        podman rmi "$old" >/dev/null 2>&1 || log "note: previous image $old kept (still in use)"
    fi
    remove_dangling
}

# Untagged images without children that were built on our base: the `requirements` stage's leftovers. The
# layer cache (untagged images with children) and other people's images stay.
remove_dangling() {
    local base_layer id
    base_layer="$(podman image inspect --format '{{index .RootFS.Layers 0}}' "$BASE_TAG")"
    for id in $(podman images -a -q --filter dangling=true); do
        if [ "$(podman image inspect --format '{{index .RootFS.Layers 0}}' "$id")" = "$base_layer" ]; then
            podman rmi "$id" >/dev/null || log "note: could not remove dangling image $id"
        fi
    done
}

# run_demo NAME OWNER [podman run flags...]: in one container, as that user, write a small built-in demo dataset
# into $HOME and train on it for an epoch, the run directory on a volume owned by OWNER; check the files.
run_demo() {
    local name="$1" owner="$2" t0=$SECONDS; shift 2
    local dir="$STATE/runs-$name" log="$STATE/run-$name.log"
    rm -rf "$dir"; mkdir -p "$dir"; chown "$owner" "$dir"
    log "run as $name ($owner), --network none: demo-data (${DEMO_ARGS[*]}) + train --epochs 1 --out /runs/demo"
    podman run --rm --network none "$@" -v "$dir:/runs" --entrypoint bash "$IMAGE" -euc '
        convnext-fast demo-data "$HOME/demo" "$@"
        convnext-fast train "$HOME/demo" --preset demo --epochs 1 --out /runs/demo' demo "${DEMO_ARGS[@]}" \
        > "$log" 2>&1 || { tail -30 "$log" >&2; die "train as $name (log: $log)"; }
    local f strangers
    for f in config.json metrics.jsonl summary.json checkpoints/last.pt model.safetensors; do
        [ -s "$dir/demo/$f" ] || die "train as $name: no $f in the mounted run directory (log: $log)"
    done
    strangers="$(find "$dir/demo" \! \( -user "${owner%:*}" -group "${owner#*:}" \) -printf '%u:%g %P\n')"
    [ -z "$strangers" ] || die "train as $name: files in the run directory not owned by $owner: $strangers"
    log "run as $name: ok in $((SECONDS - t0)) s, $(find "$dir/demo" -type f | wc -l) files owned by $owner"
    rm -rf "$dir"
}

main() {
    [ "$(id -u)" = 0 ] || die "run as root: rootful podman, so file owners on the volume are the container's uids"
    install_tools
    write_containers_conf
    make_base
    build_image
    log "run --help"
    podman run --rm --network none "$IMAGE" --help > "$STATE/help.log" 2>&1 || { cat "$STATE/help.log" >&2; die "--help"; }
    grep -q train "$STATE/help.log" || die "--help does not list the train command"
    run_demo image-user 1000:1000
    run_demo other-user "$OTHER_USER" --user "$OTHER_USER"
    log "all ok ($IMAGE)"
}

# Sourced (tests/test_docker.py): define the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
