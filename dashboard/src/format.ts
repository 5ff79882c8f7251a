// Numbers, times and arguments as the page shows them, and parsing what a person types.

/** A learning rate the way people write one: 3e-4, 1.5e-3. */
export function fmtLr(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (value === 0) return "0";
  return Number(value.toPrecision(3)).toExponential().replace("e+", "e");
}

/** Short and readable across magnitudes: 2.345, 0.0123, 1.2e-5, 12345. */
export function fmtNum(value: number | null | undefined, digits = 4): string {
  if (value === null || value === undefined) return "–";
  if (!Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2).replace("e+", "e");
  return String(Number(value.toPrecision(digits)));
}

/** A multiple of the lr: ×0.5, ×1, ×64. */
export function fmtFactor(value: number): string {
  return `×${Number(value.toPrecision(3))}`;
}

/** A relative change in percent, signed: +12.3%, −4.5%, 0.0%; "–" where there is none. */
export function fmtChange(percent: number | null): string {
  if (percent === null || !Number.isFinite(percent)) return "–";
  const text = Math.abs(percent).toFixed(1);
  if (text === "0.0") return "0.0%";
  return `${percent > 0 ? "+" : "−"}${text}%`;
}

/** An axis label: short enough for the axis gutter (12k, 1.5M). */
export function fmtTick(value: number): string {
  const abs = Math.abs(value);
  if (abs >= 1e6) return `${Number((value / 1e6).toPrecision(3))}M`;
  if (abs >= 1e4) return `${Number((value / 1e3).toPrecision(3))}k`;
  return fmtNum(value, 3);
}

/** {lr: 0.0015, name: "x"}; "" for no arguments. */
export function fmtArgs(args: Record<string, unknown> | null | undefined): string {
  const entries = Object.entries(args ?? {});
  if (entries.length === 0) return "";
  return `{${entries.map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(", ")}}`;
}

const pad = (n: number): string => String(n).padStart(2, "0");

export function fmtClock(epochSeconds: number): string {
  const d = new Date(epochSeconds * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDate(epochSeconds: number, seconds = false): string {
  const d = new Date(epochSeconds * 1000);
  const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return `${day} ${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ""}`;
}

export function fmtDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)}s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m}m ${pad(Math.floor(seconds % 60))}s`;
  return `${Math.floor(m / 60)}h ${pad(m % 60)}m`;
}

// Plain decimal or scientific notation, nothing else: Number("") is 0 and Number("0x10") is 16.
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

/** The number typed, or null for anything that is not one ("abc", "", "1e", "Infinity"). */
export function parseNumber(text: string): number | null {
  const trimmed = text.trim();
  if (!NUMBER.test(trimmed)) return null;
  const value = Number(trimmed);
  return Number.isFinite(value) ? value : null;
}

/** Checkpoint and branch names, as the server's NAME_PATTERN allows them. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
