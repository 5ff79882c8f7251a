// The live run: its header line, the charts with the branch tree, the controls, the probes, and the console.

import { useState } from "react";
import { BranchTree } from "./BranchTree";
import { ChartGrid } from "./Charts";
import { Commands } from "./Commands";
import { Console } from "./Console";
import { Controls } from "./Controls";
import { Probes } from "./Probes";
import type { LiveRun } from "./store";

const CONNECTION_TEXT = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", ended: "run ended" };

export function RunHeader({ run }: { run: LiveRun }) {
  const s = run.state;
  const progress = s?.max_steps ? Math.min(1, s.step / s.max_steps) : 0;
  return (
    <div className="run-header">
      <span className="run-id mono" title="run id">
        {s?.run_id ?? "…"}
      </span>
      {s && <span className={`chip phase-${s.phase}`}>{s.phase}</span>}
      {s?.paused && (
        <span className="chip chip-paused" data-testid="paused-badge">
          paused
        </span>
      )}
      <span className="run-step" title="step / max steps">
        <span>
          step <b>{s?.step ?? "–"}</b>
          {s?.max_steps ? ` / ${s.max_steps}` : ""}
        </span>
        <span className="progress">
          <span className="progress-bar" style={{ transform: `scaleX(${progress})` }} />
        </span>
      </span>
      {s && (
        <span className="run-branch" title="the branch training is on">
          <span className="swatch" style={{ background: run.colors.color(s.branch) }} />
          {s.branch}
        </span>
      )}
      <span className={`connection connection-${run.connection}`} data-testid="connection">
        {CONNECTION_TEXT[run.connection]}
      </span>
    </div>
  );
}

export function LiveView({ run, hidden: offscreen }: { run: LiveRun; hidden: boolean }) {
  const [hidden, setHidden] = useState<ReadonlySet<string>>(new Set());
  const toggle = (name: string) =>
    setHidden((prev) => {
      const next = new Set(prev);
      if (!next.delete(name)) next.add(name);
      return next;
    });

  // Branches in the order they got their colors: the tree's, then any that logged before the tree knew it.
  const names = run.branches.map((b) => b.name);
  for (const name of run.metrics.branches()) if (!names.includes(name)) names.push(name);
  const visible = names.filter((name) => !hidden.has(name));

  return (
    <main className="live" hidden={offscreen}>
      <ChartGrid metrics={run.metrics} version={run.metrics.version} branches={visible} colors={run.colors} decisions={run.decisions} branchInfo={run.branches}>
        <BranchTree branches={run.branches} colors={run.colors} hidden={hidden} onToggle={toggle} current={run.state?.branch} />
      </ChartGrid>
      <aside className="controls">
        <Controls run={run} />
        <Probes commands={[...run.commands.values()]} empty="none yet: “probe” (optimizer) trains ×0.5, ×1 and ×2 a few steps from here, then puts the run back" />
        <Commands run={run} />
      </aside>
      <Console lines={run.lines} />
    </main>
  );
}
