// The run's branches as a tree: each loaded checkpoint forks a child off the branch that was active.
// The checkboxes choose which branches the charts draw.

import type { BranchColors } from "./colors";
import type { Branch } from "./types";

interface Props {
  branches: readonly Branch[];
  colors: BranchColors;
  hidden: ReadonlySet<string>;
  onToggle: (name: string) => void;
  current?: string; // the branch training is on now (live only)
}

export function BranchTree({ branches, colors, hidden, onToggle, current }: Props) {
  const known = new Set(branches.map((b) => b.name));
  const children = new Map<string | null, Branch[]>();
  for (const b of branches) {
    // A parent we do not know (yet) makes a root rather than losing the branch.
    const parent = b.parent !== null && known.has(b.parent) ? b.parent : null;
    children.set(parent, [...(children.get(parent) ?? []), b]);
  }

  const rows: { branch: Branch; depth: number }[] = [];
  const walk = (parent: string | null, depth: number) => {
    for (const branch of children.get(parent) ?? []) {
      rows.push({ branch, depth });
      walk(branch.name, depth + 1);
    }
  };
  walk(null, 0);

  return (
    <section className="card tree" data-testid="branch-tree">
      <h3 className="card-title">branches</h3>
      <ul className="tree-list">
        {rows.map(({ branch: b, depth }) => (
          <li key={b.name} data-testid={`branch-${b.name}`} style={{ paddingLeft: depth * 16 }}>
            <label className="tree-row">
              <input type="checkbox" checked={!hidden.has(b.name)} onChange={() => onToggle(b.name)} />
              {depth > 0 && <span className="tree-elbow">↳</span>}
              <span className="swatch" style={{ background: colors.color(b.name) }} />
              <span className="tree-name">{b.name}</span>
              {b.name === current && <span className="chip chip-active">training</span>}
            </label>
            <div className="tree-meta">
              {b.checkpoint === null
                ? "the run's first branch"
                : `from ${b.checkpoint} @ step ${b.checkpoint_step ?? "?"}` + (b.fork_step !== null ? `, forked at step ${b.fork_step}` : "")}
            </div>
          </li>
        ))}
        {rows.length === 0 && <li className="muted">no branches yet</li>}
      </ul>
    </section>
  );
}
