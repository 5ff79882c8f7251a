"""Held-out workloads (docs/held-out-workloads.md): model shapes, optimizer families, schedules and start lrs
that counterfactual collection refuses (evals/counterfactual.py `RunSpec`) and nothing is tuned or trained on;
the lr-suite's held-out cells are built from them (evals/lr_suite.py). The names are those of
evals/counterfactual.py's SHAPES, OPTIMIZERS and SCHEDULES tables.
"""

# Never collected: a model shape, an optimizer, and the start lrs of the held-out cells. The lr-suite's held-out cells
# come from here (evals/lr_suite.py WORKLOADS["deep-rmsprop"]).
HELD_OUT = {"shape": "deep", "optimizer": "rmsprop", "start_lrs": (1e-5, 3e-4, 3e-2)}
# A second held-out workload, defined before issue 25's supervisors were tuned (docs/held-out-workloads.md):
# its shape, optimizer family and schedule are each never collected. Its start lrs are 1/32, 1 and 32
# times the best of a static grid (60 steps, seed 0: 1e-3 4.46, 3e-3 3.63, 1e-2 3.21, 3e-2 3.26,
# 1e-1 3.21, 3e-1 3.38, 1.0 3.46).
HELD_OUT_2 = {
    "shape": "deep-narrow",
    "optimizer": "adagrad",
    "schedule": "cosine_warmup",
    "start_lrs": (3.125e-4, 1e-2, 0.32),
}
# A third, defined 2026-12-07 before anything ran on it (docs/held-out-workloads.md): its shape and schedule are
# refused; its optimizer, Adafactor, only reflector-heldout's evaluation rows used (nothing trains on it). Start
# lrs 1/32, 1 and 32 times the best of a static grid (60 steps, seed 0: 1e-5 4.98, 1e-4 4.00, 3e-4 3.26,
# 1e-3 2.86, 3e-3 2.92, 1e-2 3.16, 3e-2 3.50, 0.1 3.64, 0.3 4.51, 1.0 72.9).
HELD_OUT_3 = {
    "shape": "wide-shallow",
    "optimizer": "adafactor",
    "schedule": "inverse_sqrt_warmup",
    "start_lrs": (3.125e-5, 1e-3, 3.2e-2),
}
# A fourth, defined 2026-12-07 before anything ran on it, to judge a change to the probe that its first three had
# motivated (docs/held-out-workloads.md): its shape and schedule are refused; plain SGD (no momentum) is a setting
# no supervisor was tuned on (the grid's SGD has momentum 0.9). Start lrs: 1/32, 1 and 32 times the best of a
# static grid (60 steps, seed 0: 0.03 3.84, 0.1 3.51, 0.3 3.46, 1.0 3.92, 3.0 4.75, 10 10.7).
HELD_OUT_4 = {
    "shape": "deep-thin",
    "optimizer": "sgd-plain",
    "schedule": "constant_warmup",
    "start_lrs": (9.375e-3, 0.3, 9.6),
}
# A fifth, defined 2026-12-07 before the evidence intervener (docs/lr-suite-probe/evidence) was trained
# (docs/held-out-workloads.md): its shape and its schedule are refused; SGD with Nesterov momentum 0.95 is a setting
# nothing was collected or tuned on (the grid's SGD: momentum 0.9, no Nesterov). Start lrs: 1/32, 1 and 32 times
# the best of a static grid (60 steps, seed 0: 3e-3 3.95, 1e-2 3.47, 3e-2 3.28, 0.1 3.15, 0.3 3.29, 1.0 3.47).
HELD_OUT_5 = {
    "shape": "mid",
    "optimizer": "sgd-nesterov",
    "schedule": "cosine_restarts",
    "start_lrs": (3.125e-3, 0.1, 3.2),
}
HELD_OUT_SHAPES = tuple(w["shape"] for w in (HELD_OUT, HELD_OUT_2, HELD_OUT_3, HELD_OUT_4, HELD_OUT_5))
HELD_OUT_SCHEDULES = tuple(w["schedule"] for w in (HELD_OUT_2, HELD_OUT_3, HELD_OUT_4, HELD_OUT_5))
# Workloads collected only to evaluate on (docs/held-out-workloads.md), never trained on: a reflector's
# (issue 26). They are recipe runs, refused like any other where their shape, optimizer or schedule is
# held out, but their start lrs may be HELD_OUT's (a grid of half-decades passes 3e-4 and 3e-2): those
# rows are evaluation rows themselves. `evaluation_workload(spec)` says whether a row is one of them.
EVALUATION_WORKLOADS = {
    "reflector-heldout": {  # defined 2026-12-06 for issue 26
        "recipe": "tiny",
        "overrides": (
            "model.n_layer=2", "model.n_embd=48", "model.n_head=3", "training.optim=adafactor",
            "training.lr_scheduler_type=linear", "training.warmup_steps=0", "training.max_steps=60",
            "training.eval_steps=10", "training.per_device_train_batch_size=8",
        ),
        "lrs": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
        "seeds": (0, 1, 2, 3),
        "policy": "random",
    },
    "reflector-heldout-2": {  # defined 2026-12-07 for issue 26, to score the reflector chosen on validation rows
        "recipe": "tiny",
        "overrides": (
            "model.n_layer=3", "model.n_embd=40", "model.n_head=4", "training.optim=adafactor",
            "training.lr_scheduler_type=warmup_stable_decay", "training.warmup_steps=5",
            "training.lr_scheduler_kwargs={num_decay_steps: 20}", "training.max_steps=60",
            "training.eval_steps=10", "training.per_device_train_batch_size=8",
        ),
        "lrs": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
        "seeds": tuple(range(8)),
        "policy": "random",
    },
    "reflector-heldout-3": {  # defined 2026-12-08 for issue 26, to score a retrained reflector once
        "recipe": "tiny",
        "overrides": (
            "model.n_layer=4", "model.n_embd=32", "model.n_head=2", "training.optim=adamw_torch",
            "training.adam_beta1=0.5", "training.adam_beta2=0.9", "training.weight_decay=0.0",
            "training.lr_scheduler_type=polynomial", "training.warmup_steps=5",
            "training.lr_scheduler_kwargs={power: 2.0}", "training.max_steps=60",
            "training.eval_steps=10", "training.per_device_train_batch_size=12",
        ),
        "lrs": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
        "seeds": tuple(range(8)),
        "policy": "random",
    },
}  # the overrides as --set takes them # fmt: skip
