// The five charts of a run, the same live and in the history; an extra cell (the branch tree) fills the grid.

import { type ReactNode, useCallback, useMemo } from "react";
import { Chart } from "./Chart";
import type { BranchColors } from "./colors";
import type { MetricStore } from "./series";
import type { Branch, Decision } from "./types";

interface ChartSpec {
  name: string;
  title: string;
  log?: boolean;
  markers?: boolean; // the supervisor decides on the losses: its decisions go on those charts
}

export const CHARTS: readonly ChartSpec[] = [
  { name: "loss", title: "train loss", markers: true },
  { name: "eval_loss", title: "eval loss", markers: true },
  { name: "learning_rate", title: "learning rate", log: true },
  { name: "grad_norm", title: "grad norm" },
  { name: "samples_per_s", title: "throughput, samples/s" },
];

interface Props {
  metrics: MetricStore;
  version: number; // metrics.version: the store is mutable, this says when it changed
  branches: readonly string[]; // the visible ones, in color order
  colors: BranchColors;
  decisions: readonly Decision[];
  branchInfo: readonly Branch[]; // the run's branches: rollbacks of self-correction are among them
  children?: ReactNode;
}

/** Self-correction's rollbacks: branches loaded from a "rollback-N" checkpoint (graphs/supervise.py). */
export function rollbacksOf(branches: readonly Branch[]): Branch[] {
  return branches.filter((b) => b.checkpoint?.startsWith("rollback-"));
}

export function ChartGrid({ metrics, version, branches, colors, decisions, branchInfo, children }: Props) {
  const rollbacks = useMemo(() => rollbacksOf(branchInfo), [branchInfo]);
  // A branch a rollback left is abandoned: drawn faded, so the line the run went on stands out.
  const abandoned = useMemo(() => new Set(rollbacks.map((b) => b.parent ?? "")), [rollbacks]);
  const branchKey = branches.join("\u0000");
  const data = useMemo(
    () => CHARTS.map((spec) => metrics.chart(spec.name, [...branches], spec.log)),
    // branches is read through branchKey: a new array with the same names needs no new data.
    [metrics, version, branchKey],
  );
  const color = useCallback((branch: string) => colors.color(branch), [colors]);
  return (
    <div className="charts">
      {CHARTS.map((spec, i) => (
        <Chart
          key={spec.name}
          name={spec.name}
          title={spec.title}
          data={data[i]!}
          color={color}
          log={spec.log}
          decisions={spec.markers ? decisions : undefined}
          rollbacks={spec.markers ? rollbacks : undefined}
          faded={abandoned}
        />
      ))}
      {children}
    </div>
  );
}
