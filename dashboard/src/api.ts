// Talking to the control server: typed fetches, the bearer token, and the event WebSocket.

import type { paths } from "./api-types";
import type { Bounds, CommandType, ServerEvent } from "./types";

/** What a GET route answers (200, JSON), as the server's OpenAPI declares it: a route the server no longer
 * has, or a shape it changed, fails the dashboard's compile instead of its users. */
type Got<P extends keyof paths> = paths[P] extends { get: { responses: { 200: { content: { "application/json": infer T } } } } }
  ? T
  : never;
/** A paged list route's row type. */
type Row<P extends keyof paths> = Got<P> extends readonly (infer T)[] ? T : never;
type Posted<P extends keyof paths> = paths[P] extends { post: { responses: { 200: { content: { "application/json": infer T } } } } }
  ? T
  : never;

// -----------------------------------------------------------------------------
// the token

// sessionStorage, not localStorage: a token should not outlive the tab it was given to.
const TOKEN_KEY = "selfsteer.token";

/** Moves ?token= from the address bar into sessionStorage, so it is not left in history or screenshots. */
export function takeTokenFromUrl(): void {
  const url = new URL(window.location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  setToken(token);
  url.searchParams.delete("token");
  window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
}

export function getToken(): string | null {
  try {
    return window.sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null; // storage disabled: run without a token
  }
}

export function setToken(token: string | null): void {
  try {
    if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
    else window.sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: nothing to keep
  }
}

// -----------------------------------------------------------------------------
// HTTP

/** A failed request. status 0: the server could not be reached. detail: the server's own words. */
export class ApiError extends Error {
  readonly status: number;
  readonly detail: string;

  constructor(status: number, detail: string) {
    super(status ? `${status}: ${detail}` : detail);
    this.status = status;
    this.detail = detail;
  }
}

export const isUnauthorized = (err: unknown): boolean => err instanceof ApiError && err.status === 401;
export const isNotFound = (err: unknown): boolean => err instanceof ApiError && err.status === 404;

// FastAPI says why in "detail": a string for our own errors, a list of {loc, msg} for a bad body.
async function detailOf(response: Response): Promise<string> {
  const text = await response.text();
  try {
    const body: unknown = JSON.parse(text);
    if (body && typeof body === "object" && "detail" in body) {
      const detail = (body as { detail: unknown }).detail;
      if (typeof detail === "string") return detail;
      if (Array.isArray(detail)) {
        return detail
          .map((d) => (d && typeof d === "object" && "msg" in d ? String((d as { msg: unknown }).msg) : String(d)))
          .join("; ");
      }
      return JSON.stringify(detail);
    }
  } catch {
    // not JSON: the text itself is the best we have
  }
  return text.trim() || response.statusText || "request failed";
}

async function send(path: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  const token = getToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let response: Response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch {
    throw new ApiError(0, `cannot reach the server (${init.method ?? "GET"} ${path})`);
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
  return (await (await send(path, init)).json()) as T;
}

/** The next page of a list that grows: a full page names it in `Link: <URL>; rel="next"`. */
function nextPage(response: Response): string | null {
  const link = response.headers.get("Link");
  return link?.match(/<([^>]+)>\s*;\s*rel="next"/)?.[1] ?? null;
}

/** Every row of a paged list (metrics, commands, decisions), page after page. */
async function getAll<T>(path: string): Promise<T[]> {
  const rows: T[] = [];
  let next: string | null = path;
  while (next !== null) {
    const response: Response = await send(next);
    rows.push(...((await response.json()) as T[]));
    next = nextPage(response);
  }
  return rows;
}

const get = <T>(path: string): Promise<T> => request<T>(path);
const enc = encodeURIComponent;

/** Charts draw at most a few thousand points a series: a history comes down-sampled (the server keeps each
 * range's lowest and highest value, its NaN and the latest row), what streams in afterwards comes whole. */
export const HISTORY_POINTS = 1000;

function metricsPath(base: string, since?: number, points?: number): string {
  const query = new URLSearchParams();
  if (since !== undefined) query.set("since", String(since));
  if (points !== undefined) query.set("points", String(points));
  const text = query.toString();
  return text ? `${base}?${text}` : base;
}

export const api = {
  info: () => get<Got<"/api/info">>("/api/info"),
  state: () => get<Got<"/api/state">>("/api/state"),
  /** Metric rows after `since`; `points`: down-sampled to about that many ranges of steps. */
  metrics: (since?: number, points?: number) => getAll<Row<"/api/metrics">>(metricsPath("/api/metrics", since, points)),
  commands: () => getAll<Row<"/api/commands">>("/api/commands"),
  command: (uuid: string) => get<Got<"/api/commands/{uuid}">>(`/api/commands/${enc(uuid)}`),
  // The args' JSON Schemas are free-form in the OpenAPI: CommandType names what the page reads of them.
  commandTypes: () => get<Got<"/api/command-types"> & CommandType[]>("/api/command-types"),
  checkpoints: () => get<Got<"/api/checkpoints">>("/api/checkpoints"),
  branches: () => get<Got<"/api/branches">>("/api/branches"),
  decisions: (afterId = 0) => getAll<Row<"/api/decisions">>(`/api/decisions?after_id=${afterId}`),
  postCommand: (type: string, args: Record<string, unknown>) =>
    request<Posted<"/api/commands">>("/api/commands", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type, args, source: "human" }),
    }),

  runs: (limit = 100) => get<Got<"/api/runs">>(`/api/runs?limit=${limit}`),
  run: (id: string) => get<Got<"/api/runs/{run_id}">>(`/api/runs/${enc(id)}`),
  runMetrics: (id: string, points?: number) =>
    getAll<Row<"/api/runs/{run_id}/metrics">>(metricsPath(`/api/runs/${enc(id)}/metrics`, undefined, points)),
  runDecisions: (id: string) => getAll<Row<"/api/runs/{run_id}/decisions">>(`/api/runs/${enc(id)}/decisions`),
  runCommands: (id: string) => getAll<Row<"/api/runs/{run_id}/commands">>(`/api/runs/${enc(id)}/commands`),
  runBranches: (id: string) => get<Got<"/api/runs/{run_id}/branches">>(`/api/runs/${enc(id)}/branches`),
};

/** The bounds of one argument of one command, as the server's schema states them (null: it states none). */
export function boundsOf(types: readonly CommandType[], type: string, arg: string): Bounds | null {
  const schema = types.find((t) => t.type === type)?.args_schema.properties?.[arg];
  if (typeof schema?.minimum !== "number" || typeof schema.maximum !== "number") return null;
  return { min: schema.minimum, max: schema.maximum };
}

// -----------------------------------------------------------------------------
// the event WebSocket

export interface StreamHandlers {
  onEvent(event: ServerEvent): void;
  /** reconnected: this is not the first connection, so events may have been missed meanwhile. */
  onOpen(reconnected: boolean): void;
  /** The socket closed (or never opened); the stream tries again unless closed. */
  onDown(code: number, wasOpen: boolean): void;
}

const MIN_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;

function eventsUrl(): string {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const token = getToken();
  // Browsers cannot put a header on a WebSocket: the server takes ?token= there.
  const query = token ? `?token=${enc(token)}` : "";
  return `${scheme}://${window.location.host}/api/events${query}`;
}

/** WS /api/events, reconnecting with exponential backoff (and jitter) until close(). */
export class EventStream {
  private ws: WebSocket | null = null;
  private retries = 0;
  private everOpened = false;
  private closed = false;
  private timer: number | undefined;
  private readonly handlers: StreamHandlers;

  constructor(handlers: StreamHandlers) {
    this.handlers = handlers;
    this.connect();
  }

  close(): void {
    this.closed = true;
    window.clearTimeout(this.timer);
    this.ws?.close();
    this.ws = null;
  }

  private connect(): void {
    if (this.closed) return;
    let wasOpen = false;
    const ws = new WebSocket(eventsUrl());
    this.ws = ws;
    ws.onopen = () => {
      wasOpen = true;
      this.retries = 0;
      this.handlers.onOpen(this.everOpened);
      this.everOpened = true;
    };
    ws.onmessage = (message: MessageEvent) => {
      if (typeof message.data !== "string") return;
      let event: unknown;
      try {
        event = JSON.parse(message.data);
      } catch {
        return; // not ours to understand
      }
      if (event && typeof event === "object" && "event" in event) this.handlers.onEvent(event as ServerEvent);
    };
    ws.onclose = (close: CloseEvent) => {
      if (this.closed || this.ws !== ws) return;
      this.handlers.onDown(close.code, wasOpen);
      if (this.closed) return; // the handler gave up on the stream
      const delay = Math.min(MAX_RETRY_MS, MIN_RETRY_MS * 2 ** this.retries++) * (0.8 + 0.4 * Math.random());
      this.timer = window.setTimeout(() => this.connect(), delay);
    };
  }
}
