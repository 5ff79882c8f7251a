"""make_interactive works on TRL trainers too (they are Trainer subclasses): SFTTrainer on a tiny model."""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")


def test_sft_trainer_is_steerable(tmp_path):
    from datasets import Dataset
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    from selfsteer.trainer_bridge import BridgeClient, BridgeConfig, make_interactive
    from selfsteer.trainer_bridge.data import CorpusSpec, load_corpus
    from selfsteer.trainer_bridge.store import Store

    train, _ = load_corpus(CorpusSpec(block_size=32, max_train_bytes=20_000))
    data = Dataset.from_list([{"input_ids": train[i]["input_ids"].tolist()} for i in range(len(train))])
    config = GPT2Config(vocab_size=384, n_positions=32, n_embd=32, n_layer=1, n_head=2, pad_token_id=0)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,  # SFTConfig's default schedule is a linear decay
        report_to="none",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    # The three added lines: import, wrap the class, pass where to serve.
    InteractiveSFTTrainer = make_interactive(trl.SFTTrainer)
    trainer = InteractiveSFTTrainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=data,
        processing_class=ByT5Tokenizer(),
        bridge=BridgeConfig(port=0, db=tmp_path / "db.sqlite"),
    )
    with BridgeClient(trainer.bridge.url) as client:
        uuid = client.set_lr(0.01)["uuid"]  # before training: applied at step 0
        trainer.train()
        row = client.command(uuid)
    assert row["status"] == "success" and row["step"] == 0
    with Store(tmp_path / "db.sqlite") as store:
        lr = {
            m["step"]: m["value"] for m in store.get_metrics(trainer.bridge.run_id, names=["learning_rate"])
        }
        assert store.get_run(trainer.bridge.run_id)["status"] == "finished"
    assert lr[1] == pytest.approx(0.01) and lr[6] == pytest.approx(0.005)  # the decay, from the new lr
    trainer.bridge.close()
