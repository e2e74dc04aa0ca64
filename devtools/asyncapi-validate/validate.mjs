// Validates AsyncAPI documents with the official parser (@asyncapi/parser, pinned in
// package-lock.json) and prints one JSON line per document on stdout:
//   {"source": path, "parser": version, "parsed": bool,
//    "diagnostics": [{severity, code, message, path}], "messages": [{id, name}]}
// `parsed` is false when the parser refused the document (it had errors). `messages` is
// what generated code sees: each message's id (an anonymous message has none).
// Run by tests/integration/devtools/test_asyncapi_parser.py, or by hand after `npm ci`:
//   node validate.mjs docs/asyncapi.json [more.json ...]
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Parser } from '@asyncapi/parser';

const SEVERITIES = ['error', 'warning', 'info', 'hint'];

const sources = process.argv.slice(2);
if (sources.length === 0) {
  console.error('usage: node validate.mjs ASYNCAPI_DOCUMENT [...]');
  process.exit(2);
}
const { version } = createRequire(import.meta.url)('@asyncapi/parser/package.json');
const parser = new Parser();
for (const source of sources) {
  const { document, diagnostics } = await parser.parse(readFileSync(source, 'utf8'), { source });
  const report = {
    source,
    parser: version,
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      severity: SEVERITIES[d.severity],
      code: String(d.code),
      message: d.message,
      path: d.path.join('/'),
    })),
    messages: document
      ? document.allMessages().all().map((m) => ({ id: m.id() ?? null, name: m.name() ?? null }))
      : [],
  };
  console.log(JSON.stringify(report));
}
