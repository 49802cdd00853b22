// The WebSocket backend of bench/tls-front: echoes every message back unchanged, on loopback.
//   node ws-echo.mjs PORT      (prints "ready" once listening)
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2]);
const server = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
server.on('connection', (socket) => {
  socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary }));
  socket.on('error', () => {});
});
server.on('listening', () => console.log('ready'));
