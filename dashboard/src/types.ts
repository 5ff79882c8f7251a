// The control server's JSON, as trainer_bridge/server.py and the store write it.
// Timestamps are seconds since the epoch (floats); a metric value is null where it was NaN or infinite.

export type Phase = "created" | "starting" | "running" | "finished" | "stopped" | "failed";

export interface Optimizer {
  name: string;
  lr?: number;
  weight_decay?: number;
  betas?: number[];
  eps?: number;
  momentum?: number;
}

export interface RunState {
  step: number;
  max_steps?: number;
  epoch?: number | null;
  max_grad_norm?: number | null;
  optimizer?: Optimizer | null;
  run_id: string | null;
  phase: Phase | string;
  paused: boolean;
  branch: string;
  url: string | null;
  world_size: number;
  metrics: Record<string, number | null>;
}

export interface MetricRow {
  id: number;
  run_id: string;
  branch: string;
  step: number;
  name: string;
  value: number | null;
  time: number;
}

// One training or evaluation log, as the WebSocket batches them.
export interface MetricPoint {
  step: number;
  branch: string;
  values: Record<string, number | null>;
}

export type CommandStatus = "pending" | "running" | "success" | "failed";

// A row of the command journal.
export interface Command {
  uuid: string;
  run_id: string;
  type: string;
  args: Record<string, unknown>;
  source: string;
  status: CommandStatus;
  created_at: number;
  updated_at: number;
  step: number | null;
  result: unknown;
  error: string | null;
}

export interface Accepted {
  uuid: string;
  status: CommandStatus;
  step: number;
}

export interface Checkpoint {
  name: string;
  path: string;
  step: number;
  branch: string;
  source: string;
  uuid: string;
}

export interface Branch {
  name: string;
  parent: string | null;
  checkpoint: string | null;
  checkpoint_step: number | null;
  fork_step: number | null;
  uuid: string | null;
}

export type Action = "double" | "halve" | "keep";

// A supervisor's decision, written into the store by the supervisor (not pushed on the WebSocket).
export interface Decision {
  id: number;
  run_id: string;
  step: number;
  agent: string;
  strategy: string | null;
  model: string | null;
  action: Action | string;
  explanation: string;
  lr_before: number | null;
  lr_after: number | null;
  latency_s: number | null;
  fallback: boolean | number;
  created_at: number;
  rolled_back?: boolean; // self-correction: judged a failure and rolled back
  reflection?: string | null; // why it failed, in the supervisor's words
}

export interface Run {
  id: string;
  name: string;
  kind: string;
  status: string;
  created_at: number;
  finished_at: number | null;
  summary: Record<string, unknown> | null;
  config?: unknown;
}

// GET /api/command-types: what a run accepts, with the JSON Schema of each command's args.
export interface CommandType {
  type: string;
  description: string;
  args_schema: { properties?: Record<string, { minimum?: number; maximum?: number }> };
}

export interface Bounds {
  min: number;
  max: number;
}

export interface Info {
  mode: "live" | "history";
  run_id: string | null;
  version: string;
}

export type ServerEvent =
  | { event: "state"; state: RunState }
  | { event: "metrics"; points: MetricPoint[] }
  | { event: "command"; command: Command };
