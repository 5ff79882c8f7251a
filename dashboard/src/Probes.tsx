// The run's probes (trainer_bridge/probe.py): each arm trained a few steps at a multiple of the lr from the
// same snapshot, then the run was put back. The latest probe shows as a table, an earlier one when picked
// by its step: each arm's lr, its slice loss after the steps, its estimate at the horizon and how that
// estimate compares with the ×1 arm's (the run's own lr); the winner (lowest estimate) is marked. Restart
// arms (trained from the run's start) show below, each loss against the run's now.

import { useState } from "react";
import { fmtChange, fmtFactor, fmtLr, fmtNum } from "./format";
import type { Command, ProbeArm, ProbeRestart, ProbeResult } from "./types";

/** The table of a probe that succeeded; null for anything else (pending, failed, another command). */
export function probeResult(command: Command): ProbeResult | null {
  if (command.type !== "probe" || command.status !== "success") return null;
  const result = command.result;
  if (!result || typeof result !== "object" || !Array.isArray((result as { arms?: unknown }).arms)) return null;
  return result as ProbeResult;
}

/** The arm's estimate against the ×1 arm's, in percent (negative: lower, so better); null without one. */
export function changeVsKeep(arm: ProbeArm, arms: readonly ProbeArm[]): number | null {
  const keep = arms.find((a) => a.factor === 1)?.estimate;
  if (arm.estimate === null || keep === null || keep === undefined || !(keep > 0)) return null;
  return (arm.estimate / keep - 1) * 100;
}

interface Props {
  commands: readonly Command[];
  empty?: string; // what to say while there is no probe; without it nothing shows
}

export function Probes({ commands, empty }: Props) {
  // The probe a person picked (uuid); null: the latest, so a new one shows when it comes.
  const [picked, setPicked] = useState<string | null>(null);
  const probes = commands.filter((c) => c.type === "probe").sort((a, b) => a.created_at - b.created_at);
  const latest = probes.at(-1);
  const shown = probes.find((c) => c.uuid === picked) ?? latest;
  if (!shown && empty === undefined) return null;

  return (
    <section className="card control-card probes" data-testid="probes">
      <h3 className="card-title">
        probe
        {probes.length > 1 && <span className="muted">{probes.length} so far</span>}
      </h3>
      {probes.length > 1 && (
        <div className="probe-picks" data-testid="probe-picks">
          {probes.map((c) => (
            <button
              key={c.uuid}
              data-testid="probe-pick"
              data-step={c.step ?? ""}
              data-status={c.status}
              className={`small${c === shown ? " active" : ""}`}
              title={`${c.status}, sent by ${c.source}`}
              onClick={() => setPicked(c === latest ? null : c.uuid)}
            >
              {c.step === null ? c.status : `step ${c.step}`}
            </button>
          ))}
        </div>
      )}
      {shown ? <ProbeView command={shown} /> : <p className="muted probe-empty">{empty}</p>}
    </section>
  );
}

function ProbeView({ command }: { command: Command }) {
  const result = probeResult(command);
  if (command.status === "failed") {
    return (
      <div className="control-error" data-testid="probe-error">
        probe failed{command.step === null ? "" : ` at step ${command.step}`}: {command.error ?? "no reason given"}
      </div>
    );
  }
  if (result === null) {
    return (
      <p className="muted" data-testid="probe-waiting">
        {command.status === "success" ? "the probe gave no table" : `probe ${command.status}: it runs at the next step boundary…`}
      </p>
    );
  }
  return <ProbeTable result={result} uuid={command.uuid} />;
}

function ProbeTable({ result, uuid }: { result: ProbeResult; uuid: string }) {
  const { arms } = result;
  return (
    <>
      <div className="probe-caption" data-testid="probe-caption" data-uuid={uuid} data-step={result.step}>
        at step <b>{result.step}</b> · {result.steps} steps per arm · estimated at {result.horizon} steps · cost{" "}
        {result.cost_steps} optimizer steps
        <div className="muted">
          from lr {fmtLr(result.lr)}, slice loss {fmtNum(result.start)} · {result.seconds.toFixed(2)} s
        </div>
      </div>
      <table className="table probe-table" data-testid="probe-table">
        <thead>
          <tr>
            <th>factor</th>
            <th>lr</th>
            <th className="num" title={`the eval slice's loss after ${result.steps} steps`}>
              after {result.steps}
            </th>
            <th className="num" title={`extrapolated to ${result.horizon} steps (exponential fit)`}>
              est. {result.horizon}
            </th>
            <th className="num" title="the estimate against the ×1 arm's (lower is better)">
              vs ×1
            </th>
          </tr>
        </thead>
        <tbody>
          {arms.map((arm) => {
            const best = arm.factor === result.best_factor;
            const change = changeVsKeep(arm, arms);
            const diverged = arm.diverged || arm.estimate === null;
            return (
              <tr
                key={arm.factor}
                data-testid="probe-arm"
                data-factor={arm.factor}
                data-best={best}
                data-diverged={diverged}
                className={best ? "probe-best" : diverged ? "probe-diverged" : undefined}
                title={best ? "the lowest estimate: the probe's pick" : undefined}
              >
                <td className="mono" data-testid="probe-factor">
                  {fmtFactor(arm.factor)}
                  {best && <span className="probe-star"> ★</span>}
                </td>
                <td className="mono" data-testid="probe-lr">
                  {fmtLr(arm.lr)}
                </td>
                {(arm.final !== null || !diverged) && (
                  <td className="num" data-testid="probe-final">
                    {fmtNum(arm.final)}
                  </td>
                )}
                {diverged ? (
                  <Diverged span={arm.final === null ? 3 : 2} steps={result.steps} />
                ) : (
                  <>
                    <td className="num" data-testid="probe-estimate">
                      {fmtNum(arm.estimate)}
                    </td>
                    <td className={`num${change !== null && change < 0 ? " probe-lower" : ""}`} data-testid="probe-change">
                      {arm.factor === 1 ? <span className="muted">ref</span> : fmtChange(change)}
                    </td>
                  </>
                )}
              </tr>
            );
          })}
        </tbody>
      </table>
      {result.restarts && result.restarts.length > 0 && <RestartTable restarts={result.restarts} now={result.start} />}
    </>
  );
}

/** Restart arms: from the run's start at a multiple of its whole schedule, as many steps as the run had
 * trained, so each loss compares with the run's now as measured (no estimate). */
function RestartTable({ restarts, now }: { restarts: ProbeRestart[]; now: number | null }) {
  return (
    <table className="table probe-table" data-testid="probe-restarts">
      <thead>
        <tr>
          <th title="trained from the run's start, the whole schedule times this">from the start</th>
          <th>lr</th>
          <th className="num" title="the eval slice's loss after as many steps as the run had trained">
            after {restarts[0]?.train_loss.length}
          </th>
          <th className="num" title="against the run's slice loss now (lower is better)">
            vs now
          </th>
        </tr>
      </thead>
      <tbody>
        {restarts.map((arm) => {
          const change = arm.final !== null && now !== null && now > 0 ? (arm.final / now - 1) * 100 : null;
          return (
            <tr key={arm.factor} data-testid="probe-restart" data-factor={arm.factor}>
              <td className="mono">{fmtFactor(arm.factor)}</td>
              <td className="mono" data-testid="probe-restart-lr">
                {fmtLr(arm.lr)}
              </td>
              <td className="num" data-testid="probe-restart-final">
                {arm.final === null ? "diverged" : fmtNum(arm.final)}
              </td>
              <td className={`num${change !== null && change < 0 ? " probe-lower" : ""}`} data-testid="probe-restart-change">
                {fmtChange(change)}
              </td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );
}

/** A diverged arm's cells: a loss that was not finite (within the probe's steps) has no estimate. */
function Diverged({ span, steps }: { span: number; steps: number }) {
  return (
    <td colSpan={span} className="probe-diverged-text" data-testid="probe-diverged" title={`its loss was not finite within ${steps} steps`}>
      diverged
    </td>
  );
}
