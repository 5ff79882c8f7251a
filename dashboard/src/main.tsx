import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { takeTokenFromUrl } from "./api";
import { App } from "./App";
import "./styles.css";

// Before anything asks the server: the token moves from the address bar into this tab's storage.
takeTokenFromUrl();

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
