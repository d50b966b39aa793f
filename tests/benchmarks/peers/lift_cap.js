// Preloaded into Node-RED (NODE_OPTIONS=--require) for the "cap lifted" run: node-red-contrib-opcua
// asks every subscription for at most 10 notifications per publish response, which caps what a
// subscription delivers; 0 asks for no limit.  Nothing else changes.
"use strict";
const path = require("path");
const basics = require(
  path.join(process.env.EDGETWIN_BENCH_MODULES, "node-red-contrib-opcua", "opcua", "opcua-basics.js")
);
const shipped = basics.getSubscriptionParameters;
basics.getSubscriptionParameters = (ms) => Object.assign(shipped(ms), { maxNotificationsPerPublish: 0 });
