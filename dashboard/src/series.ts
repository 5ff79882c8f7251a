// Metric values by name, branch and step, and their alignment for uPlot.
// Keyed by step, so a point that arrives twice (a refetch after a reconnect overlaps the stream) is kept once.

import type { MetricPoint, MetricRow } from "./types";

export type Value = number | null;

/** What one chart draws: uPlot wants one x array shared by every series, with null where a series has none. */
export interface ChartData {
  steps: number[];
  series: { branch: string; values: Value[] }[];
}

export class MetricStore {
  // name -> branch -> step -> value
  private readonly data = new Map<string, Map<string, Map<number, Value>>>();
  /** Grows on every change; charts recompute only when it moved. */
  version = 0;
  lastStep = -1;

  /** Stores one point; returns the names that were new (a repeated name/branch/step is ignored). */
  addPoint(point: MetricPoint): string[] {
    const fresh: string[] = [];
    for (const [name, raw] of Object.entries(point.values)) {
      const value = typeof raw === "number" && Number.isFinite(raw) ? raw : null;
      let byBranch = this.data.get(name);
      if (!byBranch) this.data.set(name, (byBranch = new Map()));
      let bySteps = byBranch.get(point.branch);
      if (!bySteps) byBranch.set(point.branch, (bySteps = new Map()));
      if (bySteps.has(point.step)) continue;
      bySteps.set(point.step, value);
      fresh.push(name);
    }
    if (fresh.length) {
      this.version++;
      this.lastStep = Math.max(this.lastStep, point.step);
    }
    return fresh;
  }

  branches(): string[] {
    const seen = new Set<string>();
    for (const byBranch of this.data.values()) for (const branch of byBranch.keys()) seen.add(branch);
    return [...seen];
  }

  /** The named metric for these branches over the union of their steps. positive: log scales drop <= 0. */
  chart(name: string, branches: string[], positive = false): ChartData {
    const byBranch = this.data.get(name);
    const columns = branches.flatMap((branch) => {
      const bySteps = byBranch?.get(branch);
      return bySteps ? [{ branch, bySteps }] : [];
    });
    const union = new Set<number>();
    for (const { bySteps } of columns) for (const step of bySteps.keys()) union.add(step);
    const steps = [...union].sort((a, b) => a - b);
    const series = columns.map(({ branch, bySteps }) => ({
      branch,
      values: steps.map((step) => {
        const value = bySteps.get(step);
        if (value === undefined || value === null) return null;
        return positive && value <= 0 ? null : value;
      }),
    }));
    return { steps, series };
  }
}

/** Rows of /api/metrics regrouped into points, one per (branch, step), in step order. */
export function rowsToPoints(rows: MetricRow[]): MetricPoint[] {
  const points = new Map<string, MetricPoint>();
  for (const row of rows) {
    const key = `${row.branch}\u0000${row.step}`;
    let point = points.get(key);
    if (!point) points.set(key, (point = { step: row.step, branch: row.branch, values: {} }));
    point.values[row.name] = row.value;
  }
  return [...points.values()].sort((a, b) => a.step - b.step);
}

export function countPoints(data: ChartData): number {
  let n = 0;
  for (const { values } of data.series) for (const v of values) if (v !== null) n++;
  return n;
}
