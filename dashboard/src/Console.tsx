// What happened, one line each: commands and their outcome, state changes, decisions, warnings, errors.
// It follows new lines unless the reader scrolled up to look at older ones.

import { useLayoutEffect, useRef } from "react";
import { fmtClock } from "./format";
import type { ConsoleLine } from "./store";

export function Console({ lines }: { lines: readonly ConsoleLine[] }) {
  const boxRef = useRef<HTMLDivElement>(null);
  const following = useRef(true);

  useLayoutEffect(() => {
    const box = boxRef.current;
    if (box && following.current) box.scrollTop = box.scrollHeight;
  }, [lines]);

  return (
    <section className="card console-card">
      <h3 className="card-title">console</h3>
      <div
        className="console"
        data-testid="console"
        ref={boxRef}
        onScroll={(e) => {
          const box = e.currentTarget;
          following.current = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
        }}
      >
        {lines.map((line) => (
          <div key={line.id} className={`console-line kind-${line.kind}`} data-testid="console-line" data-kind={line.kind}>
            <span className="console-time">{fmtClock(line.time / 1000)}</span>
            <span className="console-text">{line.text}</span>
          </div>
        ))}
      </div>
    </section>
  );
}
