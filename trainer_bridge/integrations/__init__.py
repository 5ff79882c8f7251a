"""selfsteer.integrations: the steering core's adapters, one per kind of training loop.

- `hf_trainer`: the Hugging Face Trainer (and TRL's trainers): `make_interactive`, `attach`.
- `plain`: a plain PyTorch loop that sets its own lr (nanoGPT style): `selfsteer.attach(...)`.
- `lightning`: PyTorch Lightning: `SteerCallback`.
- `accelerate`: an accelerate custom loop: `selfsteer.attach(..., accelerator=...)`.

This folder lives in trainer_bridge/ beside the core and is installed as `selfsteer.integrations`.
"""

if __name__ != "selfsteer.integrations":
    # One import path, so each adapter class exists once (the folder is also reachable as
    # selfsteer.trainer_bridge.integrations in an editable install).
    raise ImportError(f"import selfsteer.integrations, not {__name__}")
