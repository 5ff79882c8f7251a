// Past (and present) runs from the store: pick one to see its charts, branches, decisions, probes and journal.

import { useEffect, useMemo, useState } from "react";
import { ApiError, HISTORY_POINTS, api, isNotFound, isUnauthorized } from "./api";
import { BranchTree } from "./BranchTree";
import { ChartGrid } from "./Charts";
import { glyph } from "./Chart";
import { BranchColors } from "./colors";
import { fmtArgs, fmtDate, fmtDuration, fmtLr, fmtNum } from "./format";
import { Probes } from "./Probes";
import { MetricStore, rowsToPoints } from "./series";
import type { Branch, Command, Decision, Run } from "./types";

interface Loaded {
  run: Run;
  metrics: MetricStore;
  colors: BranchColors;
  branches: Branch[];
  decisions: Decision[];
  commands: Command[];
}

const finalEvalLoss = (run: Run): number | null => {
  // summary is free-form (whatever the run wrote): read it as a JSON object, if it is one.
  const summary = run.summary;
  const value = summary && typeof summary === "object" ? (summary as Record<string, unknown>).final_eval_loss : undefined;
  return typeof value === "number" ? value : null;
};

const explain = (err: unknown): string => (err instanceof ApiError ? err.message : String(err));

export function History({ onUnauthorized, hidden: offscreen }: { onUnauthorized: () => void; hidden: boolean }) {
  const [runs, setRuns] = useState<Run[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [selected, setSelected] = useState<string | null>(null);
  const [loaded, setLoaded] = useState<Loaded | null>(null);
  const [loading, setLoading] = useState(false);
  const [hidden, setHidden] = useState<ReadonlySet<string>>(new Set());

  const fail = (err: unknown, what: string) => {
    if (isUnauthorized(err)) return onUnauthorized();
    setError(isNotFound(err) ? `this server keeps no run history (${what}: 404)` : `${what} failed: ${explain(err)}`);
  };

  const loadRuns = () => {
    api.runs(100).then(setRuns, (err: unknown) => fail(err, "GET /api/runs"));
  };
  useEffect(loadRuns, []); // once; the refresh button asks again

  useEffect(() => {
    if (selected === null) return;
    let current = true;
    setLoading(true);
    setError(null);
    Promise.all([api.run(selected), api.runMetrics(selected, HISTORY_POINTS), api.runBranches(selected), api.runDecisions(selected), api.runCommands(selected)])
      .then(([run, rows, branches, decisions, commands]) => {
        if (!current) return;
        const metrics = new MetricStore();
        for (const point of rowsToPoints(rows)) metrics.addPoint(point);
        const colors = new BranchColors();
        colors.see(branches.map((b) => b.name));
        colors.see(metrics.branches());
        setLoaded({ run, metrics, colors, branches, decisions: [...decisions].sort((a, b) => a.id - b.id), commands });
        setHidden(new Set());
      })
      .catch((err: unknown) => current && fail(err, `loading run ${selected}`))
      .finally(() => current && setLoading(false));
    return () => {
      current = false;
    };
  }, [selected]);

  const names = useMemo(() => {
    if (!loaded) return [];
    const list = loaded.branches.map((b) => b.name);
    for (const name of loaded.metrics.branches()) if (!list.includes(name)) list.push(name);
    return list;
  }, [loaded]);
  const visible = names.filter((name) => !hidden.has(name));
  const toggle = (name: string) =>
    setHidden((prev) => {
      const next = new Set(prev);
      if (!next.delete(name)) next.add(name);
      return next;
    });

  return (
    <main className="history" hidden={offscreen}>
      <section className="card runs-card">
        <h3 className="card-title">
          runs
          <button className="small" onClick={loadRuns}>
            refresh
          </button>
        </h3>
        {error && <div className="control-error">{error}</div>}
        <div className="table-scroll">
          <table className="table" data-testid="runs-table">
            <thead>
              <tr>
                <th>name</th>
                <th>kind</th>
                <th>status</th>
                <th>started</th>
                <th>duration</th>
                <th className="num">final eval loss</th>
              </tr>
            </thead>
            <tbody>
              {(runs ?? []).map((run) => (
                <tr
                  key={run.id}
                  data-testid={`run-row-${run.id}`}
                  className={`clickable${run.id === selected ? " selected" : ""}`}
                  onClick={() => setSelected(run.id)}
                >
                  <td>
                    {run.name} <span className="muted mono">{run.id}</span>
                  </td>
                  <td>{run.kind}</td>
                  <td>
                    <span className={`chip phase-${run.status}`}>{run.status}</span>
                  </td>
                  <td>{fmtDate(run.created_at)}</td>
                  <td>{run.finished_at === null ? "running" : fmtDuration(run.finished_at - run.created_at)}</td>
                  <td className="num">{fmtNum(finalEvalLoss(run))}</td>
                </tr>
              ))}
              {runs !== null && runs.length === 0 && (
                <tr>
                  <td colSpan={6} className="muted">
                    no runs in the store
                  </td>
                </tr>
              )}
            </tbody>
          </table>
        </div>
      </section>

      {selected === null && runs !== null && runs.length > 0 && <p className="muted hint">Pick a run to see its charts, decisions and journal.</p>}
      {loading && <p className="muted hint">loading {selected}…</p>}

      {loaded && (
        <>
          <div className="history-charts">
            <ChartGrid metrics={loaded.metrics} version={loaded.metrics.version} branches={visible} colors={loaded.colors} decisions={loaded.decisions} branchInfo={loaded.branches}>
              <BranchTree branches={loaded.branches} colors={loaded.colors} hidden={hidden} onToggle={toggle} />
            </ChartGrid>
          </div>
          <DecisionLog decisions={loaded.decisions} />
          <Probes key={loaded.run.id} commands={loaded.commands} />
          <Journal commands={loaded.commands} />
        </>
      )}
    </main>
  );
}

function DecisionLog({ decisions }: { decisions: readonly Decision[] }) {
  return (
    <section className="card">
      <h3 className="card-title">decisions ({decisions.length})</h3>
      <table className="table" data-testid="decision-log">
        <thead>
          <tr>
            <th className="num">step</th>
            <th>agent</th>
            <th>action</th>
            <th>lr before → after</th>
            <th className="num">latency</th>
            <th>explanation</th>
          </tr>
        </thead>
        <tbody>
          {decisions.map((d) => (
            <tr key={d.id} data-testid="decision-row">
              <td className="num">{d.step}</td>
              <td>{d.agent}</td>
              <td>
                <span className={`marker-${d.action}`}>{glyph(d.action)}</span> {d.action}
                {d.fallback && <span className="flag">fallback</span>}
                {Boolean(d.rolled_back) && <span className="flag" data-testid="rolled-back">rolled back</span>}
              </td>
              <td className="mono">
                {fmtLr(d.lr_before)} → {fmtLr(d.lr_after)}
              </td>
              <td className="num">{d.latency_s == null ? "–" : `${d.latency_s.toFixed(2)} s`}</td>
              <td className="wrap">
                {d.explanation}
                {d.reflection && <div className="muted">{d.rolled_back ? "↺ " : "✗ "}{d.reflection}</div>}
              </td>
            </tr>
          ))}
          {decisions.length === 0 && (
            <tr>
              <td colSpan={6} className="muted">
                no supervisor decisions in this run
              </td>
            </tr>
          )}
        </tbody>
      </table>
    </section>
  );
}

function Journal({ commands }: { commands: readonly Command[] }) {
  return (
    <section className="card">
      <h3 className="card-title">command journal ({commands.length})</h3>
      <table className="table" data-testid="journal">
        <thead>
          <tr>
            <th>created</th>
            <th>source</th>
            <th>type</th>
            <th>args</th>
            <th>status</th>
            <th className="num">step</th>
            <th>error</th>
          </tr>
        </thead>
        <tbody>
          {commands.map((c) => (
            <tr key={c.uuid} data-testid="journal-row">
              <td>{fmtDate(c.created_at, true)}</td>
              <td>{c.source}</td>
              <td className="mono">{c.type}</td>
              <td className="mono wrap">{fmtArgs(c.args)}</td>
              <td>
                <span className={`chip status-${c.status}`}>{c.status}</span>
              </td>
              <td className="num">{c.step ?? "–"}</td>
              <td className="wrap">{c.error ?? ""}</td>
            </tr>
          ))}
          {commands.length === 0 && (
            <tr>
              <td colSpan={7} className="muted">
                no commands in this run
              </td>
            </tr>
          )}
        </tbody>
      </table>
    </section>
  );
}
