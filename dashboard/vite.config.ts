import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// Read by Vite under Node; declared here so the file needs no @types/node.
declare const process: { env: Record<string, string | undefined> };

// `npm run dev` serves the page with hot reload and forwards /api (WebSocket included) to a running
// `selfsteer train --port 7011` (or SELFSTEER_URL). The control server accepts a WebSocket only from its
// own origin, so the proxy presents itself as that origin.
const target = process.env.SELFSTEER_URL ?? "http://127.0.0.1:7011";

export default defineConfig({
  base: "/",
  plugins: [react()],
  build: { outDir: "dist", assetsDir: "assets", sourcemap: false },
  server: {
    proxy: {
      "/api": {
        target,
        ws: true,
        changeOrigin: true,
        configure: (proxy) => {
          proxy.on("proxyReq", (req) => req.setHeader("origin", target));
          proxy.on("proxyReqWs", (req) => req.setHeader("origin", target));
        },
      },
    },
  },
});
