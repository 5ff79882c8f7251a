// Warnings about a run's health, computed in the browser from the metrics as they arrive.
// The checks are pure functions; WarningTracker keeps the little history they need, per branch.

import type { MetricPoint } from "./types";

export type WarningKind = "nan_loss" | "grad_norm";

export interface Warning {
  kind: WarningKind;
  branch: string;
  step: number;
  text: string;
}

export const GRAD_HISTORY = 20; // the median is over this many previous grad norms of the branch
export const GRAD_MIN_HISTORY = 5; // fewer than this: too little to call anything exploding
export const GRAD_FACTOR = 10;
export const THROTTLE_STEPS = 20; // one warning per (kind, branch) per this many steps

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const isFiniteNumber = (value: unknown): value is number => typeof value === "number" && Number.isFinite(value);

const short = (value: number): string => (Math.abs(value) >= 100 ? value.toFixed(1) : String(Number(value.toPrecision(3))));

/** A loss the server sent as null (NaN or infinite there) or that is not a finite number. */
export function nonFiniteLoss(point: MetricPoint): Warning | null {
  for (const name of ["loss", "eval_loss"]) {
    if (name in point.values && !isFiniteNumber(point.values[name])) {
      const what = name === "loss" ? "NaN loss" : "NaN eval loss";
      return { kind: "nan_loss", branch: point.branch, step: point.step, text: `${what} at step ${point.step} on branch ${point.branch}` };
    }
  }
  return null;
}

/** A grad norm above GRAD_FACTOR x the median of the previous ones (given at least GRAD_MIN_HISTORY), or not finite. */
export function explodingGradNorm(previous: readonly number[], value: number | null, step: number, branch: string): Warning | null {
  const recent = previous.slice(-GRAD_HISTORY);
  const med = median(recent);
  const medText = recent.length ? ` (median ${short(med)})` : "";
  if (!isFiniteNumber(value)) {
    return { kind: "grad_norm", branch, step, text: `grad norm exploding: not finite at step ${step} on branch ${branch}${medText}` };
  }
  if (recent.length < GRAD_MIN_HISTORY || !(value > GRAD_FACTOR * med)) return null;
  return { kind: "grad_norm", branch, step, text: `grad norm exploding: ${short(value)} at step ${step} on branch ${branch}${medText}` };
}

/** Whether a warning at `step` is due, given the step of the last one of its kind and branch. */
export function isDue(lastWarnedStep: number | undefined, step: number): boolean {
  return lastWarnedStep === undefined || step - lastWarnedStep >= THROTTLE_STEPS || step < lastWarnedStep;
}

/** Feed it every metrics point once, in step order; it returns the warnings that are due. */
export class WarningTracker {
  private readonly gradNorms = new Map<string, number[]>(); // branch -> last GRAD_HISTORY finite values
  private readonly lastWarned = new Map<string, number>(); // `${kind}/${branch}` -> step

  check(point: MetricPoint): Warning[] {
    const found: Warning[] = [];
    const loss = nonFiniteLoss(point);
    if (loss) found.push(loss);
    if ("grad_norm" in point.values) {
      const history = this.gradNorms.get(point.branch) ?? [];
      const value = point.values.grad_norm ?? null;
      const grad = explodingGradNorm(history, value, point.step, point.branch);
      if (grad) found.push(grad);
      if (isFiniteNumber(value)) this.gradNorms.set(point.branch, [...history, value].slice(-GRAD_HISTORY));
    }
    return found.filter((warning) => {
      const key = `${warning.kind}/${warning.branch}`;
      if (!isDue(this.lastWarned.get(key), warning.step)) return false;
      this.lastWarned.set(key, warning.step);
      return true;
    });
  }
}
