// A real OpenID Connect provider on 127.0.0.1 for the sign-in tests (oauth2-mock-server).
//
// Usage: node tests/browser/oidc/provider.mjs <port> <install folder>
// (the install folder holds node_modules/ from `npm ci` of this folder's package-lock.json: scripts/test.sh)
//
// The authorize step shows a small sign-in form (subject, e-mail, name) instead of redirecting at once;
// submitting it issues the code, and the ID token of that code carries the claims typed. Each browser
// context therefore signs in as whoever it types, with no shared state between contexts.
import http from "node:http";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [portArg, installDir] = process.argv.slice(2);
if (!portArg || !installDir) {
  console.error("usage: node provider.mjs <port> <install folder>");
  process.exit(2);
}
const entry = path.join(installDir, "node_modules", "oauth2-mock-server", "dist", "index.mjs");
const { OAuth2Issuer, OAuth2Service } = await import(pathToFileURL(entry).href);

const port = Number(portArg);
const issuer = new OAuth2Issuer();
issuer.url = `http://127.0.0.1:${port}`;
await issuer.keys.generate("RS256");
const service = new OAuth2Service(issuer);

const CLAIMS = ["sub", "email", "name"];
const claimsByCode = new Map(); // authorization code -> the claims typed in the form

service.on("beforeAuthorizeRedirect", (redirect, req) => {
  const query = new URL(req.url, issuer.url).searchParams;
  const code = redirect.url.searchParams.get("code");
  if (code) {
    claimsByCode.set(code, Object.fromEntries(CLAIMS.map((c) => [c, query.get(`login_${c}`) ?? ""])));
  }
});
service.on("beforeTokenSigning", (token, req) => {
  const claims = claimsByCode.get(req.body?.code);
  if (claims) Object.assign(token.payload, claims); // the access token and the ID token of that code
});

const escape = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginForm(url) {
  const hidden = [...url.searchParams]
    .map(([k, v]) => `<input type="hidden" name="${escape(k)}" value="${escape(v)}">`)
    .join("\n");
  const field = (c, label) =>
    `<label>${label} <input name="login_${c}" id="login_${c}" required></label><br>`;
  return `<!doctype html><html><head><title>Test identity provider</title></head><body>
<h1>Test identity provider</h1>
<form method="get" action="/authorize">
${hidden}
${field("sub", "Subject")}
${field("email", "E-mail")}
${field("name", "Name")}
<button type="submit">Sign in</button>
</form></body></html>`;
}

const handler = service.requestHandler;
const server = http.createServer((req, res) => {
  const url = new URL(req.url, issuer.url);
  if (url.pathname === "/authorize" && !url.searchParams.has("login_sub")) {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end(loginForm(url));
    return;
  }
  handler(req, res);
});
server.listen(port, "127.0.0.1", () => console.log(`oidc provider ready on ${issuer.url}`));
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
