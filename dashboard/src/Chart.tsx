// One metric over steps, one line per branch, drawn by uPlot on a canvas; supervisor decisions as
// markers over it.
//
// uPlot is imperative: the chart is built once per set of series (and rebuilt when a branch appears or is
// hidden), fed with setData as the metrics grow, and sized to its box by a ResizeObserver. The markers are
// React elements portaled into uPlot's overlay; uPlot's draw hook places them, so they follow zooms and
// resizes.

import { useCallback, useEffect, useLayoutEffect, useRef, useState } from "react";
import { createPortal } from "react-dom";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { fmtLr, fmtNum, fmtTick } from "./format";
import { type ChartData, countPoints } from "./series";
import type { Branch, Decision } from "./types";

export interface ChartProps {
  name: string; // the metric; the element is data-testid="chart-<name>"
  title: string;
  data: ChartData;
  color: (branch: string) => string;
  log?: boolean;
  decisions?: readonly Decision[];
  rollbacks?: readonly Branch[]; // self-correction's rollbacks: a line at the step each happened
  faded?: ReadonlySet<string>; // branches drawn faded (abandoned by a rollback)
}

interface Marker {
  decision: Decision;
  left: number;
  top: number;
  value: number; // the value at the marker's height (its data-value: tests check it is the curve's)
}

export const GLYPH: Record<string, string> = { double: "▲", halve: "▼", keep: "●" };
export const glyph = (action: string): string => GLYPH[action] ?? "◆";

const AXIS = "#6b7280";
const GRID = "#eef0f3";
const FONT = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

function aligned(data: ChartData): uPlot.AlignedData {
  return [data.steps, ...data.series.map((s) => s.values)];
}

function lastValue(values: ArrayLike<number | null | undefined> | undefined): number | null {
  if (!values) return null;
  for (let i = values.length - 1; i >= 0; i--) {
    const v = values[i];
    if (v !== null && v !== undefined) return v;
  }
  return null;
}

// Away from the cursor the legend shows each branch's latest value: on a live run, the number one wants.
const legendValue =
  (fmt: (v: number | null) => string) =>
  (u: uPlot, v: number | null, seriesIdx: number, idx: number | null): string =>
    fmt(idx === null ? lastValue(u.data[seriesIdx]) : v);

// uPlot marks 1..9 of every decade on a log axis; that many labels overlap. Over a decade or two, 1 and 3
// of each are enough to read a learning rate; over more, the decades alone (every other one past six).
function logFilter(u: uPlot, splits: number[]): (number | null)[] {
  const min = u.scales.y?.min ?? 1;
  const max = u.scales.y?.max ?? 1;
  const decades = Math.log10(max / min);
  return splits.map((v) => {
    const exponent = Math.floor(Math.log10(v) + 1e-9);
    const mantissa = Number((v / 10 ** exponent).toPrecision(2));
    if (decades <= 2.5) return mantissa === 1 || mantissa === 3 ? v : null;
    if (decades <= 6) return mantissa === 1 ? v : null;
    return mantissa === 1 && exponent % 2 === 0 ? v : null;
  });
}

interface Hooks {
  draw: (u: uPlot) => void;
  setScale: (u: uPlot, key: string) => void;
}

function options(data: ChartData, color: (branch: string) => string, log: boolean, hooks: Hooks, faded: ReadonlySet<string>): uPlot.Options {
  const fmt = log ? fmtLr : (v: number | null) => fmtNum(v);
  const axis = (size: number): uPlot.Axis => ({
    stroke: AXIS,
    font: FONT,
    size,
    grid: { stroke: GRID, width: 1 },
    ticks: { stroke: GRID, width: 1, size: 3 },
  });
  const yAxis: uPlot.Axis = { ...axis(46), values: (_u, splits) => splits.map((v) => (v == null ? "" : log ? fmtLr(v) : fmtTick(v))) };
  if (log) {
    yAxis.filter = logFilter;
    yAxis.grid = { ...yAxis.grid, filter: logFilter };
    yAxis.ticks = { ...yAxis.ticks, filter: logFilter };
  }
  return {
    width: 300,
    height: 150, // placeholders: the ResizeObserver sizes it to its box at once
    legend: { show: true, live: true },
    cursor: { drag: { x: true, y: false }, points: { size: 6 } },
    scales: {
      x: { time: false },
      // uPlot's own log range pads to whole decades, which flattens a constant lr into a line at the
      // bottom; a factor of 2.5 either way keeps it readable and still shows a halving clearly.
      y: log ? { distr: 3, log: 10, range: (_u, min, max) => (min === null || max === null ? [1e-4, 1e-2] : [min / 2.5, max * 2.5]) } : {},
    },
    series: [
      { label: "step", value: legendValue((v) => (v === null ? "–" : String(v))) },
      ...data.series.map((s) => ({
        label: s.branch,
        stroke: color(s.branch),
        width: 1.5,
        alpha: faded.has(s.branch) ? 0.3 : 1,
        spanGaps: true, // branches log at different steps: the union of steps leaves holes in each
        value: legendValue(fmt),
      })),
    ],
    axes: [axis(26), yAxis],
    hooks: { draw: [hooks.draw], setScale: [hooks.setScale] },
  };
}

/** Where each decision goes on the plot (CSS px in the overlay): on the curve at the step it took effect
 * (`applied_step`; the step it was observed at while its command is pending, or when it sent none),
 * whatever its action. That step often falls between two logged points (or just past the last one): its
 * height is the line's there. Only a chart with no value at all puts it at the bottom. */
function placeMarkers(u: uPlot, data: ChartData, decisions: readonly Decision[]): Marker[] {
  const min = u.scales.x?.min;
  const max = u.scales.x?.max;
  if (min === undefined || max === undefined) return [];
  const height = u.over.clientHeight;
  const markers: Marker[] = [];
  const lines = linesOf(data);
  for (const decision of decisions) {
    const step = effectStep(decision);
    if (step < min || step > max) continue;
    const y = curveAt(lines, step);
    const top = y === null ? height - 8 : Math.min(height - 4, Math.max(4, u.valToPos(y, "y")));
    markers.push({ decision, left: u.valToPos(step, "x"), top, value: u.posToVal(top, "y") });
  }
  return markers;
}

/** The step a decision took effect, else the step it was observed at. */
function effectStep(decision: Decision): number {
  return decision.applied_step ?? decision.step;
}

/** Each branch's drawn points: the steps where it has a value, and those values (one pass over the data). */
function linesOf(data: ChartData): { steps: number[]; values: number[] }[] {
  return data.series.map(({ values }) => {
    const line = { steps: [] as number[], values: [] as number[] };
    values.forEach((v, i) => {
      if (v !== null && v !== undefined) {
        line.steps.push(data.steps[i]!);
        line.values.push(v);
      }
    });
    return line;
  });
}

/** The height of the drawn curve at `step`: on the first branch whose line spans it (uPlot joins a
 * branch's points across the steps it has none, spanGaps), linear between the points either side; where no
 * line spans it, the end of the line nearest to it. null: no branch has a value. */
function curveAt(lines: readonly { steps: number[]; values: number[] }[], step: number): number | null {
  let nearest: { distance: number; value: number } | null = null;
  for (const { steps, values } of lines) {
    if (steps.length === 0) continue;
    let lo = 0; // the first point at or after the step (steps.length: none)
    let hi = steps.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (steps[mid]! < step) lo = mid + 1;
      else hi = mid;
    }
    if (lo < steps.length && steps[lo] === step) return values[lo]!;
    if (lo > 0 && lo < steps.length) {
      const [x0, x1, y0, y1] = [steps[lo - 1]!, steps[lo]!, values[lo - 1]!, values[lo]!];
      return y0 + ((y1 - y0) * (step - x0)) / (x1 - x0);
    }
    const end = lo === 0 ? 0 : steps.length - 1;
    const distance = Math.abs(steps[end]! - step);
    if (nearest === null || distance < nearest.distance) nearest = { distance, value: values[end]! };
  }
  return nearest?.value ?? null;
}

const sameMarkers = (a: Marker[], b: Marker[]): boolean =>
  a.length === b.length &&
  a.every((m, i) => m.decision === b[i]!.decision && Math.abs(m.left - b[i]!.left) < 0.5 && Math.abs(m.top - b[i]!.top) < 0.5);

const NONE: ReadonlySet<string> = new Set();

export function Chart({ name, title, data, color, log = false, decisions, rollbacks, faded = NONE }: ChartProps) {
  const boxRef = useRef<HTMLDivElement>(null);
  const plotRef = useRef<uPlot | null>(null);
  const dataRef = useRef(data);
  const decisionsRef = useRef(decisions);
  dataRef.current = data;
  decisionsRef.current = decisions;
  const [over, setOver] = useState<HTMLDivElement | null>(null);
  const [markers, setMarkers] = useState<Marker[]>([]);
  const [hover, setHover] = useState<{ decision: Decision; rect: DOMRect } | null>(null);
  const rollbacksRef = useRef(rollbacks);
  rollbacksRef.current = rollbacks;
  const [rollbackLines, setRollbackLines] = useState<{ branch: Branch; left: number }[]>([]);

  const layout = useCallback((u: uPlot) => {
    const next = decisionsRef.current?.length ? placeMarkers(u, dataRef.current, decisionsRef.current) : [];
    setMarkers((prev) => (sameMarkers(prev, next) ? prev : next));
    const { min, max } = u.scales.x ?? {};
    const lines = (rollbacksRef.current ?? [])
      .filter((b) => b.fork_step !== null && min != null && max != null && b.fork_step >= min && b.fork_step <= max)
      .map((branch) => ({ branch, left: u.valToPos(branch.fork_step!, "x") }));
    setRollbackLines((prev) =>
      prev.length === lines.length && prev.every((l, i) => l.branch === lines[i]!.branch && Math.abs(l.left - lines[i]!.left) < 0.5) ? prev : lines,
    );
  }, []);

  // A person who drag-zoomed (double-click zooms out) keeps the view while points stream in.
  const zoomed = useRef(false);
  const onScale = useCallback((u: uPlot, key: string) => {
    if (key !== "x") return;
    const steps = u.data[0];
    const { min, max } = u.scales.x ?? {};
    zoomed.current =
      steps.length > 1 && min != null && max != null && (min > steps[0]! || max < steps[steps.length - 1]!);
  }, []);

  const fit = useCallback((u: uPlot) => {
    const box = boxRef.current;
    if (!box || box.clientWidth === 0) return; // hidden (another tab): keep the last size
    // The legend sits in the title row (styles.css), out of the flow: the plot takes the whole box.
    const width = box.clientWidth;
    const height = Math.max(60, box.clientHeight);
    if (u.width !== width || u.height !== height) u.setSize({ width, height });
  }, []);

  // A new uPlot when the series change (branches appear, hide, show): their count and colors are fixed
  // at construction.
  const seriesKey = data.series.map((s) => `${s.branch}:${color(s.branch)}:${faded.has(s.branch)}`).join(",");
  useLayoutEffect(() => {
    const box = boxRef.current;
    if (!box) return;
    zoomed.current = false;
    const u = new uPlot(options(dataRef.current, color, log, { draw: layout, setScale: onScale }, faded), aligned(dataRef.current), box);
    plotRef.current = u;
    setOver(u.over);
    fit(u);
    return () => {
      u.destroy();
      plotRef.current = null;
      setOver(null);
      setHover(null);
    };
    // color is read through seriesKey: a new function identity alone changes nothing drawn.
  }, [seriesKey, log, layout, onScale, fit]);

  useEffect(() => {
    plotRef.current?.setData(aligned(data), !zoomed.current);
  }, [data]);

  useEffect(() => {
    if (plotRef.current) layout(plotRef.current);
  }, [decisions, rollbacks, layout]);

  useEffect(() => {
    const box = boxRef.current;
    if (!box) return;
    const observer = new ResizeObserver(() => {
      if (plotRef.current) fit(plotRef.current);
    });
    observer.observe(box);
    return () => observer.disconnect();
  }, [fit]);

  const drawn = data.series.filter((s) => s.values.some((v) => v !== null)).map((s) => s.branch);
  const empty = drawn.length === 0;

  return (
    // Past two branches the legend has no room for the cursor's step as well (styles.css drops it).
    <section className={`card chart${data.series.length > 2 ? " many" : ""}`} data-testid={`chart-${name}`} data-points={countPoints(data)} data-series={drawn.join(",")} data-faded={drawn.filter((b) => faded.has(b)).join(",")}>
      <h3 className="card-title">{title}</h3>
      <div className="plot" ref={boxRef} />
      {empty && <div className="plot-empty">no data yet</div>}
      {over &&
        createPortal(
          markers.map((m) => (
            <div
              key={m.decision.id}
              className={`marker marker-${m.decision.action}`}
              data-testid="decision-marker"
              data-action={m.decision.action}
              data-step={effectStep(m.decision)}
              data-observed-step={m.decision.step}
              data-value={Number(m.value.toPrecision(4))}
              style={{ left: m.left, top: m.top }}
              onMouseEnter={(e) => setHover({ decision: m.decision, rect: e.currentTarget.getBoundingClientRect() })}
              onMouseLeave={() => setHover(null)}
            >
              {glyph(m.decision.action)}
            </div>
          )),
          over,
        )}
      {over &&
        createPortal(
          rollbackLines.map(({ branch, left }) => (
            <div
              key={branch.name}
              className="rollback-line"
              data-testid="rollback-marker"
              data-step={branch.fork_step}
              data-branch={branch.name}
              style={{ left }}
              title={`step ${branch.fork_step}: a decision failed its check; rolled back to step ${branch.checkpoint_step} (${branch.checkpoint}) as branch ${branch.name}`}
            >
              <span>↺</span>
            </div>
          )),
          over,
        )}
      {hover && createPortal(<DecisionTooltip decision={hover.decision} rect={hover.rect} />, document.body)}
    </section>
  );
}

const TOOLTIP_WIDTH = 360;

/** Fixed to the viewport, so no card's overflow clips it; below the marker in the upper half, else above. */
function DecisionTooltip({ decision: d, rect }: { decision: Decision; rect: DOMRect }) {
  const left = Math.max(8, Math.min(rect.left + rect.width / 2 - TOOLTIP_WIDTH / 2, window.innerWidth - TOOLTIP_WIDTH - 8));
  const below = rect.top < window.innerHeight / 2;
  const style = below ? { left, top: rect.bottom + 6 } : { left, bottom: window.innerHeight - rect.top + 6 };
  return (
    <div className="tooltip" data-testid="decision-tooltip" style={style}>
      <div className="tooltip-head">
        <span className={`glyph marker-${d.action}`}>{glyph(d.action)}</span>
        <b>{d.action}</b>{" "}
        {d.applied_step != null && d.applied_step !== d.step
          ? <>observed at step {d.step}, took effect at step {d.applied_step}</>
          : <>at step {d.step}</>}
        <span className="muted"> · {d.agent}</span>
        {d.fallback && <span className="flag">fallback</span>}
      </div>
      <div>
        lr {fmtLr(d.lr_before)} → {fmtLr(d.lr_after)}
        {d.latency_s != null && <span className="muted"> · decided in {d.latency_s.toFixed(1)} s</span>}
      </div>
      {d.explanation && <div className="tooltip-text">{d.explanation}</div>}
      {d.rolled_back && <div className="tooltip-text"><span className="flag">rolled back</span> {d.reflection}</div>}
      {(d.strategy || d.model) && <div className="muted">{[d.strategy, d.model].filter(Boolean).join(" · ")}</div>}
    </div>
  );
}
