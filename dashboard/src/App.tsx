// The page: find out what the server is (a live run or only a store of past runs), ask for a token if it
// wants one, then show the live run and the history as two tabs.

import { useCallback, useEffect, useState } from "react";
import { api, getToken, isUnauthorized, setToken } from "./api";
import { History } from "./History";
import { LiveView, RunHeader } from "./LiveView";
import { LiveRun, useLiveRun } from "./store";
import { TokenForm } from "./TokenForm";
import type { Info } from "./types";

type Boot =
  | { kind: "loading" }
  | { kind: "token"; refused: boolean }
  | { kind: "ready"; info: Info }
  | { kind: "error"; text: string };

type Tab = "live" | "history";

export function App() {
  const [boot, setBoot] = useState<Boot>({ kind: "loading" });
  const [tab, setTab] = useState<Tab>("live");
  const [historyOpened, setHistoryOpened] = useState(false);
  const [run, setRun] = useState<LiveRun | null>(null);
  useLiveRun(run);

  const connect = useCallback(async () => {
    try {
      setBoot({ kind: "ready", info: await api.info() });
    } catch (err) {
      if (isUnauthorized(err)) setBoot({ kind: "token", refused: getToken() !== null });
      else setBoot({ kind: "error", text: err instanceof Error ? err.message : String(err) });
    }
  }, []);
  useEffect(() => void connect(), [connect]);

  // Any request refused for the token (it changed, or the server restarted with another) asks again.
  const onUnauthorized = useCallback(() => setBoot({ kind: "token", refused: getToken() !== null }), []);

  const mode = boot.kind === "ready" ? boot.info.mode : null;
  useEffect(() => {
    if (mode !== "live") return;
    const live = new LiveRun(onUnauthorized);
    setRun(live);
    void live.start();
    return () => {
      live.stop();
      setRun(null);
    };
  }, [mode, onUnauthorized]);

  const shown: Tab = mode === "history" ? "history" : tab;
  const open = (next: Tab) => {
    setTab(next);
    if (next === "history") setHistoryOpened(true);
  };

  const state = run?.state;
  useEffect(() => {
    document.title = state ? `${state.step}${state.max_steps ? `/${state.max_steps}` : ""} · ${state.phase} · selfsteer` : "selfsteer";
  }, [state]);

  if (boot.kind === "token") {
    return (
      <TokenForm
        refused={boot.refused}
        onSubmit={(token) => {
          setToken(token);
          setBoot({ kind: "loading" });
          void connect();
        }}
      />
    );
  }

  return (
    <div className="app">
      <header className="topbar">
        <span className="brand">selfsteer</span>
        <nav className="tabs">
          {mode !== "history" && (
            <button data-testid="tab-live" className={`tab${shown === "live" ? " active" : ""}`} onClick={() => open("live")}>
              live run
            </button>
          )}
          <button data-testid="tab-history" className={`tab${shown === "history" ? " active" : ""}`} onClick={() => open("history")}>
            history
          </button>
        </nav>
        {shown === "live" && run && <RunHeader run={run} />}
        {mode === "history" && <span className="muted">no live run on this server · selfsteer {boot.kind === "ready" ? boot.info.version : ""}</span>}
      </header>
      {boot.kind === "loading" && <p className="muted hint">connecting…</p>}
      {boot.kind === "error" && (
        <div className="hint">
          <div className="control-error">cannot reach the selfsteer server: {boot.text}</div>
          <button onClick={() => void connect()}>try again</button>
        </div>
      )}
      {run && <LiveView run={run} hidden={shown !== "live"} />}
      {mode !== null && (shown === "history" || historyOpened) && <History onUnauthorized={onUnauthorized} hidden={shown !== "history"} />}
    </div>
  );
}
