// Runs guacamole-lite (npm) with its documented server setup, as the benchmark's peer relay.
//   node lite-server.mjs WS_PORT GUACD_PORT KEY32
import GuacamoleLite from 'guacamole-lite';

const [wsPort, guacdPort, key] = process.argv.slice(2);
new GuacamoleLite(
  { port: Number(wsPort), host: '127.0.0.1' },
  { host: '127.0.0.1', port: Number(guacdPort) },
  { crypt: { cypher: 'AES-256-CBC', key } },
);
