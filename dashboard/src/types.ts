// The control server's JSON. Every REST shape is generated from the server's OpenAPI into ./api-types.ts
// (by the build: `npm run openapi && npm run types`, see dashboard/openapi.py), so the page is typed against
// what trainer_bridge/server.py really declares; only what OpenAPI cannot describe is written here: the
// WebSocket's events and the page's own shapes, in terms of the generated schemas.
// Timestamps are seconds since the epoch (floats); a metric value is null where it was NaN or infinite.

import type { components } from "./api-types";

type Schemas = components["schemas"];

export type RunState = Schemas["RunState"];
export type Phase = RunState["phase"];
export type Optimizer = NonNullable<RunState["optimizer"]>;
/** A stored metric row (GET /api/metrics, /api/runs/{id}/metrics). */
export type MetricRow = Schemas["MetricPoint"];
/** A row of the command journal. */
export type Command = Schemas["Command"];
export type CommandStatus = Command["status"];
export type Accepted = Schemas["Accepted"];
export type Checkpoint = Schemas["Checkpoint"];
export type Branch = Schemas["Branch"];
/** A supervisor's decision, written into the store by the supervisor (not pushed on the WebSocket). */
export type Decision = Schemas["Decision"];
export type Action = Decision["action"];
export type Run = Schemas["Run"];
export type RunDetail = Schemas["RunDetail"];
export type Info = Schemas["Info"];

/** GET /api/command-types: what a run accepts, with the JSON Schema of each command's args (a JSON Schema
 * is free-form in the OpenAPI; the page reads the bounds of numeric args from it). */
export type CommandType = Omit<Schemas["CommandType"], "args_schema"> & {
  args_schema: { properties?: Record<string, { minimum?: number; maximum?: number }> };
};

/** A probe's table (trainer_bridge/probe.py): the `result` of a "probe" command that succeeded, free-form
 * in the OpenAPI. Every arm trained `steps` steps at `factor` x the lr in force from the same snapshot;
 * `final` is its eval-slice loss after them, `estimate` that loss extrapolated to `horizon` steps. A
 * diverged arm's final and estimate are null (JSON has no infinity), as is any loss that was not finite. */
export interface ProbeArm {
  factor: number;
  lr: number;
  train_loss: (number | null)[];
  eval_loss: [number, number | null][];
  final: number | null;
  estimate: number | null;
  diverged: boolean;
}

/** A restart arm: from the run's start, the whole schedule times `factor`, as many steps as the run had
 * trained; `final` is its eval-slice loss then (null: not finite), to compare with the run's now (`start`). */
export interface ProbeRestart {
  factor: number;
  lr: number;
  train_loss: (number | null)[];
  final: number | null;
  checkpoint: string; // the in-memory checkpoint it ended as
}

export interface ProbeResult {
  step: number;
  lr: number;
  steps: number;
  horizon: number;
  start: number | null;
  arms: ProbeArm[];
  restarts?: ProbeRestart[]; // absent in probes journaled before restart arms existed
  best_factor: number | null; // the arm with the lowest estimate; null: every arm diverged
  cost_steps: number; // optimizer steps the probe trained, all arms together
  seconds: number;
}

export interface Bounds {
  min: number;
  max: number;
}

// -----------------------------------------------------------------------------
// WS /api/events (trainer_bridge/bridge.py publishes them; OpenAPI has no WebSocket)

/** One training or evaluation log, as the WebSocket batches them: a step's metrics on one branch. */
export interface MetricPoint {
  step: MetricRow["step"];
  branch: MetricRow["branch"];
  values: Record<string, MetricRow["value"]>;
}

/** A metric that was NaN or infinite ("nan", "inf", "-inf"), said at once. */
export interface WarningEvent {
  event: "warning";
  kind: string;
  step: number;
  branch: string;
  metrics: Record<string, string>;
  text: string;
}

export type ServerEvent =
  | { event: "state"; state: RunState }
  | { event: "metrics"; points: MetricPoint[] }
  | { event: "command"; command: Command }
  | WarningEvent;
