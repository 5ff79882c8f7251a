// Asked for when the server wants a bearer token (it answered 401) and none, or a wrong one, was given.

import { useState } from "react";

interface Props {
  refused: boolean; // a token was tried and the server said no
  onSubmit: (token: string) => void;
}

export function TokenForm({ refused, onSubmit }: Props) {
  const [token, setToken] = useState("");
  return (
    <main className="token-page">
      <form
        className="card token-card"
        data-testid="token-form"
        onSubmit={(e) => {
          e.preventDefault();
          if (token.trim()) onSubmit(token.trim());
        }}
      >
        <h2>This run needs a token</h2>
        <p className="muted">
          The control server was started with a bearer token (<code>--token</code> or <code>SELFSTEER_TOKEN</code>). Enter it
          to watch and steer the run; it is kept for this tab only. Opening the page as <code>/?token=…</code> works too.
        </p>
        <div className="row">
          <input
            data-testid="token-input"
            type="password"
            className="grow"
            autoFocus
            autoComplete="off"
            value={token}
            placeholder="token"
            aria-label="token"
            onChange={(e) => setToken(e.target.value)}
          />
          <button data-testid="token-submit" type="submit" className="primary">
            continue
          </button>
        </div>
        {refused && (
          <div className="control-error" data-testid="token-error" role="alert">
            The server refused that token.
          </div>
        )}
      </form>
    </main>
  );
}
