// The commands sent from this page and where each one is: pending, running, applied at a step, or failed.

import { fmtArgs } from "./format";
import type { LiveRun } from "./store";

const SHOWN = 30;

export function Commands({ run }: { run: LiveRun }) {
  const rows = run.mine.slice(0, SHOWN).flatMap((uuid) => {
    const command = run.commands.get(uuid);
    return command ? [command] : [];
  });
  return (
    <section className="card control-card commands">
      <h3 className="card-title">sent from this page</h3>
      <ul className="command-list">
        {rows.map((c) => (
          <li key={c.uuid} className="command-row" data-testid={`command-${c.uuid}`} data-status={c.status}>
            <span className="mono command-type">{c.type}</span>
            <span className="mono muted command-args">{fmtArgs(c.args)}</span>
            <span className={`chip status-${c.status}`}>{c.status}</span>
            {c.status === "success" && <span className="muted">at step {c.step ?? "?"}</span>}
            {c.status === "running" && <span className="muted">step {c.step ?? "?"}</span>}
            {c.status === "failed" && <div className="command-error">{c.error ?? "no reason given"}</div>}
          </li>
        ))}
        {rows.length === 0 && <li className="muted">nothing yet: commands you send show here until applied</li>}
      </ul>
    </section>
  );
}
