"""`convnext-fast tune`: the best recipe within a time budget, on one GPU or many machines (DESIGN.md §7).

tune drives train; it does not contain a loop. The study (Optuna) is the index of trials, each trial a normal
run directory ``STUDY_DIR/trials/NNNN/`` made by ``convnext_fast.train(cfg, report=...)``.

    space.py        the searched parameters, --space FILE.toml, a point -> a TrainConfig
    plan.py         the two-stage plan from measured throughput (stage 2 reserved up front)
    study.py        Optuna storage / sampler / pruner, the enqueued jobs of each stage, repair after a crash
    worker.py       a worker process: takes trials, runs each through train(), reports, prunes
    session.py      one `tune` invocation: plan or resume, start the workers, write what the user reads
    leaderboard.py  leaderboard.csv, the terminal table, best.toml
    report.py       report.html (charts.py: its inline SVG)
    runs.py         reading a trial's run directory
"""
