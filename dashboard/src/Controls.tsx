// The control panels: every control sends a command (source "human") to POST /api/commands.
// Input is checked here first so an obvious typo costs no round trip; the server checks again, and its
// 422/409 reason shows in the same place.

import { type ReactNode, useEffect, useRef, useState } from "react";
import { ApiError } from "./api";
import type { BranchColors } from "./colors";
import { NAME_PATTERN, fmtLr, fmtNum, parseNumber } from "./format";
import { type LiveRun, isEnded } from "./store";
import type { Bounds, Checkpoint } from "./types";

type Card = "optimizer" | "run" | "checkpoints" | "data";
type Send = (card: Card, type: string, args: Record<string, unknown>) => Promise<boolean>;
type Refuse = (card: Card, text: string) => void;

// Until the server has said its lr bounds (GET /api/command-types), the slider spans this.
const LOG_RANGE: [number, number] = [-8, 0];
const NAME_RULE = "letters, digits, '.', '_' or '-' (at most 64, not starting with '.', '_' or '-')";

export function Controls({ run }: { run: LiveRun }) {
  const [error, setError] = useState<{ card: Card; text: string } | null>(null);
  const state = run.state;
  const ended = state === null || isEnded(state.phase);

  const send: Send = async (card, type, args) => {
    setError(null);
    try {
      await run.send(type, args);
      return true;
    } catch (err) {
      setError({ card, text: err instanceof ApiError ? err.detail : String(err) });
      return false;
    }
  };
  const refuse: Refuse = (card, text) => setError({ card, text });
  const errorOf = (card: Card): ReactNode =>
    error?.card === card ? (
      <div className="control-error" data-testid="control-error" role="alert">
        {error.text}
      </div>
    ) : null;

  return (
    // A disabled fieldset disables every control in it: nothing can be sent to a run that is over.
    <fieldset className="controls-fields" disabled={ended}>
      <OptimizerCard
        lr={run.lr}
        lrBounds={run.lrBounds}
        weightDecay={state?.optimizer?.weight_decay ?? null}
        clip={state?.max_grad_norm ?? null}
        send={send}
        refuse={refuse}
        error={errorOf("optimizer")}
      />
      <RunCard paused={state?.paused ?? false} send={send} error={errorOf("run")} />
      <CheckpointCard checkpoints={run.checkpoints} colors={run.colors} send={send} refuse={refuse} error={errorOf("checkpoints")} />
      <DataCard send={send} refuse={refuse} error={errorOf("data")} />
    </fieldset>
  );
}

// -----------------------------------------------------------------------------

interface OptimizerProps {
  lr: number | null;
  lrBounds: Bounds | null;
  weightDecay: number | null;
  clip: number | null;
  send: Send;
  refuse: Refuse;
  error: ReactNode;
}

function OptimizerCard({ lr, lrBounds, weightDecay, clip, send, refuse, error }: OptimizerProps) {
  const [lrText, setLrText] = useState(lr === null ? "" : fmtLr(lr));
  const [wdText, setWdText] = useState("");
  const [clipText, setClipText] = useState("");
  // While a person edits the lr, a new lr from the run must not overwrite what they typed.
  const editing = useRef(false);
  useEffect(() => {
    if (!editing.current && lr !== null) setLrText(fmtLr(lr));
  }, [lr]);

  const typed = parseNumber(lrText);
  const fallback = lr !== null && lr > 0 ? Math.log10(lr) : -3;
  const slider = typed !== null && typed > 0 ? Math.log10(typed) : fallback;
  const [logMin, logMax] = lrBounds ? [Math.log10(lrBounds.min), Math.log10(lrBounds.max)] : LOG_RANGE;

  const setLr = async (value: number | null, text: string) => {
    const outside = lrBounds !== null && value !== null && (value < lrBounds.min || value > lrBounds.max);
    if (value === null || !(value > 0) || outside) {
      const range = lrBounds ? `in [${fmtLr(lrBounds.min)}, ${fmtLr(lrBounds.max)}]` : "above 0";
      return refuse("optimizer", `"${text}" is not a learning rate this run takes: enter a number ${range}, like 3e-4`);
    }
    if (await send("optimizer", "set_optimizer", { lr: value })) editing.current = false;
  };
  const scale = (factor: number) => {
    if (lr === null) return refuse("optimizer", "the current learning rate is not known yet");
    void setLr(lr * factor, fmtLr(lr * factor));
  };
  const setWd = async () => {
    const value = parseNumber(wdText);
    if (value === null || value < 0) return refuse("optimizer", `"${wdText}" is not a weight decay: enter a number ≥ 0, like 0.01`);
    if (await send("optimizer", "set_optimizer", { weight_decay: value })) setWdText("");
  };
  const setClip = async () => {
    const value = parseNumber(clipText);
    if (value === null || value < 0) return refuse("optimizer", `"${clipText}" is not a clipping norm: enter a number ≥ 0 (0 turns clipping off)`);
    if (await send("optimizer", "set_max_grad_norm", { value })) setClipText("");
  };

  return (
    <section className="card control-card">
      <h3 className="card-title">
        optimizer
        <span className="card-value" title="the current learning rate">
          lr <span data-testid="current-lr">{fmtLr(lr)}</span>
        </span>
      </h3>
      <div className="row">
        <button data-testid="lr-halve" onClick={() => scale(0.5)}>
          ½ halve
        </button>
        <button data-testid="lr-double" onClick={() => scale(2)}>
          ×2 double
        </button>
        <button
          data-testid="lr-probe"
          title="train ×0.5, ×1 and ×2 the lr a few steps from an exact snapshot, then put the run back: the probe card shows which did best"
          onClick={() => void send("optimizer", "probe", {})}
        >
          probe
        </button>
      </div>
      <div className="row">
        <input
          data-testid="lr-slider"
          type="range"
          className="grow"
          min={logMin}
          max={logMax}
          step={0.01}
          value={Math.min(logMax, Math.max(logMin, slider))}
          aria-label="learning rate (log10)"
          onChange={(e) => {
            editing.current = true;
            setLrText(fmtLr(10 ** Number(e.target.value)));
          }}
        />
      </div>
      <form
        className="row"
        onSubmit={(e) => {
          e.preventDefault();
          void setLr(typed, lrText);
        }}
      >
        <label className="field-label">lr</label>
        <input
          data-testid="lr-input"
          className="grow mono"
          value={lrText}
          placeholder="3e-4"
          aria-label="learning rate"
          onChange={(e) => {
            editing.current = true;
            setLrText(e.target.value);
          }}
        />
        <button data-testid="lr-apply" type="submit" className="primary">
          apply
        </button>
      </form>
      <FieldForm
        label="wd"
        mono
        inputId="wd-input"
        value={wdText}
        onChange={setWdText}
        placeholder={weightDecay === null ? "weight decay" : `${fmtNum(weightDecay)} now`}
        ariaLabel="weight decay"
        buttonId="wd-apply"
        buttonText="apply"
        onSubmit={setWd}
      />
      <FieldForm
        label="clip"
        mono
        inputId="clip-input"
        value={clipText}
        onChange={setClipText}
        placeholder={clip === null ? "max grad norm (0 = off)" : `${fmtNum(clip)} now (0 = off)`}
        ariaLabel="max grad norm"
        buttonId="clip-apply"
        buttonText="apply"
        onSubmit={setClip}
      />
      {error}
    </section>
  );
}

// -----------------------------------------------------------------------------

const CONFIRM_MS = 4000;

function RunCard({ paused, send, error }: { paused: boolean; send: Send; error: ReactNode }) {
  // Stopping cannot be undone: the button asks once more instead of a window.confirm dialog.
  const [confirming, setConfirming] = useState(false);
  useEffect(() => {
    if (!confirming) return;
    const timer = window.setTimeout(() => setConfirming(false), CONFIRM_MS);
    return () => window.clearTimeout(timer);
  }, [confirming]);

  return (
    <section className="card control-card">
      <h3 className="card-title">run</h3>
      <div className="row">
        <button data-testid="run-pause" disabled={paused} onClick={() => void send("run", "pause", {})}>
          ❚❚ pause
        </button>
        <button data-testid="run-resume" disabled={!paused} onClick={() => void send("run", "resume", {})}>
          ▶ resume
        </button>
        <button data-testid="run-evaluate" onClick={() => void send("run", "evaluate", {})}>
          evaluate
        </button>
        {confirming ? (
          <button
            data-testid="run-stop-confirm"
            className="danger solid"
            onClick={() => {
              setConfirming(false);
              void send("run", "stop", {});
            }}
          >
            confirm stop
          </button>
        ) : (
          <button data-testid="run-stop" className="danger" onClick={() => setConfirming(true)}>
            ■ stop
          </button>
        )}
      </div>
      {error}
    </section>
  );
}

// -----------------------------------------------------------------------------

interface CheckpointProps {
  checkpoints: readonly Checkpoint[];
  colors: BranchColors;
  send: Send;
  refuse: Refuse;
  error: ReactNode;
}

function CheckpointCard({ checkpoints, colors, send, refuse, error }: CheckpointProps) {
  const [name, setName] = useState("");
  const [branch, setBranch] = useState("");

  const save = async () => {
    const trimmed = name.trim();
    if (trimmed && !NAME_PATTERN.test(trimmed)) return refuse("checkpoints", `"${trimmed}" is not a checkpoint name: use ${NAME_RULE}`);
    if (await send("checkpoints", "save_checkpoint", trimmed ? { name: trimmed } : {})) setName("");
  };
  const load = async (checkpoint: string) => {
    const target = branch.trim();
    if (target && !NAME_PATTERN.test(target)) return refuse("checkpoints", `"${target}" is not a branch name: use ${NAME_RULE}`);
    if (target === "main") return refuse("checkpoints", "'main' is the run's first branch; a loaded checkpoint starts a new one");
    if (await send("checkpoints", "load_checkpoint", target ? { checkpoint, branch: target } : { checkpoint })) setBranch("");
  };

  return (
    <section className="card control-card">
      <h3 className="card-title">checkpoints</h3>
      <FieldForm
        inputId="ckpt-name"
        value={name}
        onChange={setName}
        placeholder="name (optional)"
        ariaLabel="checkpoint name"
        buttonId="ckpt-save"
        buttonText="save"
        onSubmit={save}
      />
      <div className="row">
        <input
          data-testid="ckpt-new-branch"
          className="grow"
          value={branch}
          placeholder="new branch name for a load (optional)"
          aria-label="new branch name"
          onChange={(e) => setBranch(e.target.value)}
        />
      </div>
      <ul className="ckpt-list" data-testid="ckpt-list">
        {checkpoints.map((c) => (
          <li key={c.uuid} className="ckpt-row" data-testid={`ckpt-row-${c.name}`}>
            <span className="ckpt-name mono" title={c.path ?? "in memory"}>
              {c.name}
            </span>
            <span className="muted">step {c.step}</span>
            <span className="ckpt-branch">
              <span className="swatch" style={{ background: colors.color(c.branch) }} />
              {c.branch}
            </span>
            <button data-testid={`ckpt-load-${c.name}`} className="small" onClick={() => void load(c.name)}>
              load → new branch
            </button>
          </li>
        ))}
        {checkpoints.length === 0 && <li className="muted">none saved yet</li>}
      </ul>
      {error}
    </section>
  );
}

// -----------------------------------------------------------------------------

function DataCard({ send, refuse, error }: { send: Send; refuse: Refuse; error: ReactNode }) {
  const [dataset, setDataset] = useState("");
  const reload = async () => {
    const name = dataset.trim();
    if (name && !NAME_PATTERN.test(name)) return refuse("data", `"${name}" is not a dataset name: use ${NAME_RULE}`);
    await send("data", "reload_data", name ? { dataset: name } : {});
  };
  return (
    <section className="card control-card">
      <h3 className="card-title">data</h3>
      <FieldForm
        inputId="data-dataset"
        value={dataset}
        onChange={setDataset}
        placeholder="dataset (optional: the current one)"
        ariaLabel="dataset"
        buttonId="data-reload"
        buttonText="reload data"
        onSubmit={reload}
      />
      {error}
    </section>
  );
}

// -----------------------------------------------------------------------------

interface FieldFormProps {
  label?: string;
  mono?: boolean;
  inputId: string;
  value: string;
  onChange(value: string): void;
  placeholder: string;
  ariaLabel: string;
  buttonId: string;
  buttonText: string;
  onSubmit(): Promise<unknown>;
}

/** One text field and its button, submitted by the button or by Enter. */
function FieldForm(props: FieldFormProps) {
  return (
    <form
      className="row"
      onSubmit={(e) => {
        e.preventDefault();
        void props.onSubmit();
      }}
    >
      {props.label && <label className="field-label">{props.label}</label>}
      <input
        data-testid={props.inputId}
        className={props.mono ? "grow mono" : "grow"}
        value={props.value}
        placeholder={props.placeholder}
        aria-label={props.ariaLabel}
        onChange={(e) => props.onChange(e.target.value)}
      />
      <button data-testid={props.buttonId} type="submit">
        {props.buttonText}
      </button>
    </form>
  );
}
