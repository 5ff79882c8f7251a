// One color per branch, the same in every chart and in the branch tree.
// Colors are handed out in the order branches are first seen (creation order), so they never move once
// given: "main" is always the first.

const PALETTE = [
  "#2563eb", // blue
  "#ea580c", // orange
  "#7c3aed", // violet
  "#0d9488", // teal
  "#db2777", // pink
  "#a16207", // ochre
  "#0891b2", // cyan
  "#4d7c0f", // olive
  "#9f1239", // wine
  "#475569", // slate
];

export class BranchColors {
  private readonly given = new Map<string, string>([["main", PALETTE[0]!]]);

  color(branch: string): string {
    let color = this.given.get(branch);
    if (color === undefined) {
      color = PALETTE[this.given.size % PALETTE.length]!;
      this.given.set(branch, color);
    }
    return color;
  }

  /** Hands out colors to branches in this order (call with the branch list before drawing). */
  see(branches: Iterable<string>): void {
    for (const branch of branches) this.color(branch);
  }
}
