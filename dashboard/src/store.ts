// The live run as this page knows it: state, metrics, journal, branches, checkpoints, decisions, console.
//
// One mutable object fed by fetches, the WebSocket and two polls. Metrics arrive in batches every half
// second and a refetch can bring thousands of rows, so React is told about changes at most every
// RENDER_MS (a version number through useSyncExternalStore), never per point.

import { useSyncExternalStore } from "react";
import { ApiError, EventStream, HISTORY_POINTS, api, boundsOf, isNotFound, isUnauthorized } from "./api";
import { BranchColors } from "./colors";
import { fmtArgs } from "./format";
import { MetricStore, rowsToPoints } from "./series";
import type { Bounds, Branch, Checkpoint, Command, CommandStatus, Decision, MetricPoint, Phase, RunState, ServerEvent } from "./types";
import { WarningTracker } from "./warnings";

export type Connection = "connecting" | "live" | "reconnecting" | "ended";
export type LineKind = "command" | "ack" | "state" | "decision" | "warning" | "error";

export interface ConsoleLine {
  id: number;
  kind: LineKind;
  time: number; // ms since the epoch
  text: string;
}

const RENDER_MS = 250;
const MAX_LINES = 500;
const DECISION_POLL_MS = 2000;
const COMMAND_POLL_MS = 1000;

const ENDED: ReadonlySet<Phase> = new Set<Phase>(["finished", "stopped", "failed"]);
export const isEnded = (phase: Phase | undefined): boolean => phase !== undefined && ENDED.has(phase);
export const isDone = (status: CommandStatus): boolean => status === "success" || status === "failed";
// Events and polls race; a status never goes back.
const RANK: Record<CommandStatus, number> = { pending: 0, running: 1, success: 2, failed: 2 };

export class LiveRun {
  state: RunState | null = null;
  readonly metrics = new MetricStore();
  readonly colors = new BranchColors();
  branches: Branch[] = [];
  checkpoints: Checkpoint[] = [];
  readonly commands = new Map<string, Command>();
  /** uuids of the commands sent from this page, newest first. */
  mine: string[] = [];
  decisions: Decision[] = [];
  lines: ConsoleLine[] = [];
  connection: Connection = "connecting";
  /** The current learning rate: the optimizer's in the last state, or a newer logged learning_rate. */
  lr: number | null = null;
  lrBounds: Bounds | null = null; // what the server accepts as an lr (its command schema says)
  version = 0;

  private readonly onUnauthorized: () => void;
  private readonly listeners = new Set<() => void>();
  private readonly warnings = new WarningTracker();
  private readonly printed = new Map<string, CommandStatus>(); // what the console said of each command
  private stream: EventStream | null = null;
  private stopped = false;
  private renderScheduled = false;
  private lastRender = 0;
  private lineId = 0;
  private timers: number[] = [];

  constructor(onUnauthorized: () => void) {
    this.onUnauthorized = onUnauthorized;
  }

  // ---- React's side

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getVersion = (): number => this.version;

  private changed(): void {
    if (this.renderScheduled || this.stopped) return;
    this.renderScheduled = true;
    const wait = Math.max(0, this.lastRender + RENDER_MS - Date.now());
    window.setTimeout(() => {
      this.renderScheduled = false;
      this.lastRender = Date.now();
      this.version++;
      for (const listener of this.listeners) listener();
    }, wait);
  }

  // ---- life

  async start(): Promise<void> {
    try {
      const [state, rows, branches, checkpoints, commands, decisions, types] = await Promise.all([
        api.state(),
        api.metrics(undefined, HISTORY_POINTS),
        api.branches(),
        api.checkpoints(),
        api.commands(),
        api.decisions(0),
        api.commandTypes(),
      ]);
      if (this.stopped) return;
      this.lrBounds = boundsOf(types, "set_optimizer", "lr");
      this.applyState(state, true);
      this.setBranches(branches);
      this.addPoints(rowsToPoints(rows), false);
      this.checkpoints = checkpoints;
      for (const command of commands) this.applyCommand(command, true);
      this.decisions = [...decisions].sort((a, b) => a.id - b.id);
      this.tellHistory(commands, this.decisions);
      this.line("state", `watching run ${state.run_id ?? "?"}: ${state.phase} at step ${state.step}, branch ${state.branch}`);
    } catch (err) {
      if (this.stopped) return;
      if (isUnauthorized(err)) return this.onUnauthorized();
      this.line("error", `loading the run failed: ${message(err)}`);
    }
    if (this.stopped) return;
    this.stream = new EventStream({
      onEvent: (event) => this.onEvent(event),
      onOpen: (reconnected) => void this.onOpen(reconnected),
      onDown: (code, wasOpen) => void this.onDown(code, wasOpen),
    });
    this.every(COMMAND_POLL_MS, () => this.pollMine());
    this.scheduleDecisionPoll();
    this.changed();
  }

  /** The console of a page opened mid-run: what was journaled and decided so far, in the order it happened. */
  private tellHistory(commands: readonly Command[], decisions: readonly Decision[]): void {
    const told: { time: number; kind: LineKind; text: string }[] = [];
    for (const c of commands) {
      told.push({ time: c.created_at, kind: "command", text: commandText(c) });
      const ack = ackText(c);
      if (ack) told.push({ time: c.updated_at, kind: "ack", text: ack });
    }
    for (const d of decisions) told.push({ time: d.created_at, kind: "decision", text: decisionText(d) });
    told.sort((a, b) => a.time - b.time);
    for (const { time, kind, text } of told.slice(-MAX_LINES)) this.line(kind, text, time * 1000);
  }

  stop(): void {
    this.stopped = true;
    this.stream?.close();
    for (const timer of this.timers) window.clearTimeout(timer);
    this.timers = [];
  }

  private every(ms: number, fn: () => Promise<void>): void {
    const tick = async () => {
      if (this.stopped) return;
      await fn();
      if (!this.stopped) this.timers.push(window.setTimeout(tick, ms));
    };
    this.timers.push(window.setTimeout(tick, ms));
  }

  // ---- the WebSocket

  private async onOpen(reconnected: boolean): Promise<void> {
    if (!isEnded(this.state?.phase)) this.connection = "live";
    if (reconnected) this.line("state", "reconnected");
    this.changed();
    // Whatever happened between the last fetch (or the drop) and this subscription came on no socket.
    // From one step before the last seen: an evaluation logs at a step whose training log we may have.
    try {
      const [rows, commands] = await Promise.all([api.metrics(Math.max(-1, this.metrics.lastStep - 1)), api.commands()]);
      if (this.stopped) return;
      this.addPoints(rowsToPoints(rows), false); // the lr: the state frame that opened the socket is newer
      for (const command of commands) this.applyCommand(command, !reconnected);
      await Promise.all([this.refreshBranches(), this.refreshCheckpoints()]);
    } catch (err) {
      this.requestFailed("catching up after connecting", err);
    }
  }

  private async onDown(code: number, wasOpen: boolean): Promise<void> {
    if (isEnded(this.state?.phase)) {
      this.stream?.close();
      this.connection = "ended";
      this.changed();
      return;
    }
    if (wasOpen) this.line("error", `connection lost (code ${code}); reconnecting`);
    this.connection = "reconnecting";
    this.changed();
    // A refused handshake shows as 1006 in a browser: ask over HTTP whether it was the token.
    if (code === 1008 || !wasOpen) {
      try {
        const state = await api.state();
        if (isEnded(state.phase)) this.applyState(state, false);
      } catch (err) {
        if (isUnauthorized(err)) {
          this.stream?.close();
          this.onUnauthorized();
        }
      }
    }
  }

  private onEvent(event: ServerEvent): void {
    if (this.stopped) return;
    if (event.event === "metrics") this.addPoints(event.points, true);
    else if (event.event === "command") this.applyCommand(event.command, false);
    else if (event.event === "state") this.applyState(event.state, false);
    this.changed();
  }

  // ---- applying what arrives

  private applyState(state: RunState, quiet: boolean): void {
    const before = this.state;
    this.state = state;
    if (isEnded(state.phase) && !isEnded(before?.phase) && before) {
      // `selfsteer train` exits soon after its run ends: ask for the last decisions while it still answers.
      void this.pollDecisions();
    }
    if (typeof state.optimizer?.lr === "number") this.lr = state.optimizer.lr;
    if (before && !quiet) {
      if (before.paused !== state.paused) this.line("state", `${state.paused ? "paused" : "resumed"} at step ${state.step}`);
      if (before.branch !== state.branch) this.line("state", `branch changed: ${before.branch} → ${state.branch} at step ${state.step}`);
      if (before.phase !== state.phase) this.line("state", `run ${state.phase} at step ${state.step}`);
    }
    if (isEnded(state.phase)) this.connection = "ended";
    this.colors.see([state.branch]);
    if (!this.branches.some((b) => b.name === state.branch)) void this.refreshBranches();
    this.changed();
  }

  private addPoints(points: MetricPoint[], live: boolean): void {
    // State events come only when something besides the step moves: the step comes with the metrics.
    const step = points.reduce((max, p) => Math.max(max, p.step), -1);
    if (this.state && step > this.state.step) this.state = { ...this.state, step };
    for (const point of points) {
      const fresh = this.metrics.addPoint(point);
      if (fresh.length === 0) continue;
      this.colors.see([point.branch]);
      const values: MetricPoint["values"] = {};
      for (const name of fresh) values[name] = point.values[name] ?? null;
      for (const warning of this.warnings.check({ ...point, values })) this.line("warning", warning.text);
      const lr = values.learning_rate;
      // A logged lr is newer than the last state only when it streams in (a refetch brings old ones).
      if (live && typeof lr === "number" && point.branch === this.state?.branch) this.lr = lr;
    }
    const unknown = this.metrics.branches().some((name) => !this.branches.some((b) => b.name === name));
    if (unknown && this.branches.length) void this.refreshBranches();
    this.changed();
  }

  private applyCommand(command: Command, quiet: boolean): void {
    const before = this.commands.get(command.uuid);
    if (before && RANK[command.status] < RANK[before.status]) return;
    this.commands.set(command.uuid, command);
    if (quiet) this.printed.set(command.uuid, command.status);
    else this.print(command);
    if (command.status === "success" && before?.status !== "success") {
      if (command.type === "load_checkpoint") {
        // The fork changes no optimizer setting, so no state event says so: the result names the branch.
        const branch = (command.result as { branch?: unknown } | null)?.branch;
        if (this.state && typeof branch === "string" && branch !== this.state.branch) {
          if (!quiet) this.line("state", `branch changed: ${this.state.branch} → ${branch} at step ${command.step ?? "?"}`);
          this.state = { ...this.state, branch };
        }
        void this.refreshBranches();
      }
      if (command.type === "save_checkpoint") void this.refreshCheckpoints();
    }
    this.changed();
  }

  private print(command: Command): void {
    const said = this.printed.get(command.uuid);
    if (said === command.status) return;
    if (said === undefined) this.line("command", commandText(command));
    const ack = ackText(command);
    if (ack) this.line("ack", ack);
    this.printed.set(command.uuid, command.status);
  }

  private setBranches(branches: Branch[]): void {
    this.branches = branches;
    this.colors.see(branches.map((b) => b.name));
    this.changed();
  }

  async refreshBranches(): Promise<void> {
    try {
      const branches = await api.branches();
      if (!this.stopped) this.setBranches(branches);
    } catch (err) {
      this.requestFailed("loading branches", err);
    }
  }

  async refreshCheckpoints(): Promise<void> {
    try {
      const checkpoints = await api.checkpoints();
      if (this.stopped) return;
      this.checkpoints = checkpoints;
      this.changed();
    } catch (err) {
      this.requestFailed("loading checkpoints", err);
    }
  }

  // ---- polls

  private scheduleDecisionPoll(): void {
    const tick = async () => {
      if (this.stopped) return;
      // The run's end polled once more (applyState); after it there is nothing to wait for.
      if (isEnded(this.state?.phase)) return;
      await this.pollDecisions();
      if (!this.stopped) {
        this.timers.push(window.setTimeout(tick, DECISION_POLL_MS));
      }
    };
    this.timers.push(window.setTimeout(tick, DECISION_POLL_MS));
  }

  private async pollDecisions(): Promise<void> {
    const lastId = this.decisions.at(-1)?.id ?? 0;
    try {
      const rows = await api.decisions(lastId);
      if (this.stopped) return;
      const fresh = rows.filter((d) => d.id > lastId).sort((a, b) => a.id - b.id);
      if (fresh.length === 0) return;
      this.decisions = [...this.decisions, ...fresh];
      for (const d of fresh) this.line("decision", decisionText(d));
      this.changed();
    } catch (err) {
      this.requestFailed("loading decisions", err);
    }
  }

  // The WebSocket says when a command moves on; this catches what a dropped socket missed.
  private async pollMine(): Promise<void> {
    const waiting = this.mine.filter((uuid) => {
      const command = this.commands.get(uuid);
      return command === undefined || !isDone(command.status);
    });
    for (const uuid of waiting) {
      try {
        this.applyCommand(await api.command(uuid), false);
      } catch (err) {
        if (!isNotFound(err)) this.requestFailed("checking a command", err);
      }
    }
  }

  // ---- sending

  /** POSTs a command from a person; throws ApiError with the server's reason when it is refused. */
  async send(type: string, args: Record<string, unknown>): Promise<void> {
    try {
      const accepted = await api.postCommand(type, args);
      this.mine = [accepted.uuid, ...this.mine];
      if (!this.commands.has(accepted.uuid)) {
        // The event usually comes first; if not, show the command until it does.
        const now = Date.now() / 1000;
        this.applyCommand(
          { uuid: accepted.uuid, run_id: this.state?.run_id ?? "", type, args, source: "human", status: accepted.status, created_at: now, updated_at: now, step: null, result: null, error: null },
          false,
        );
      }
      this.changed();
    } catch (err) {
      this.requestFailed(`sending ${type}`, err);
      throw err;
    }
  }

  // ---- the console

  line(kind: LineKind, text: string, time = Date.now()): void {
    this.lines = [...this.lines.slice(-(MAX_LINES - 1)), { id: ++this.lineId, kind, time, text }];
    this.changed();
  }

  private requestFailed(what: string, err: unknown): void {
    if (this.stopped) return;
    // A run that ended may take its server with it: a request it no longer answers is no news.
    if (isEnded(this.state?.phase) && err instanceof ApiError && (err.status === 0 || err.status >= 502)) return;
    if (isUnauthorized(err)) {
      this.stream?.close();
      this.onUnauthorized();
      return;
    }
    this.line("error", `${what} failed: ${message(err)}`);
  }
}

function commandText(command: Command): string {
  const args = fmtArgs(command.args);
  return `→ ${command.type}${args ? ` ${args}` : ""} from ${command.source}`;
}

function ackText(command: Command): string | null {
  if (command.status === "success") return `✓ ${command.type} applied at step ${command.step ?? "?"}`;
  if (command.status === "failed") return `✗ ${command.type} failed: ${command.error ?? "no reason given"}`;
  return null;
}

const decisionText = (d: Decision): string => `${d.agent} decided ${d.action} at step ${d.step}: ${d.explanation}`;

const message = (err: unknown): string => (err instanceof ApiError ? err.message : err instanceof Error ? err.message : String(err));

const subscribeNothing = () => () => {};
const noVersion = () => 0;

/** Re-renders the calling component when the run changes (at most every RENDER_MS). */
export function useLiveRun(run: LiveRun | null): number {
  return useSyncExternalStore(run ? run.subscribe : subscribeNothing, run ? run.getVersion : noVersion);
}
