// A node-opcua server for the ingest benchmark (bench_peers.py): N Double variables that all
// change every PERIOD ms, addressed like the PLC simulator's bench items
// (namespace urn:edgetwin:plcsim, s=Pump1.Bench.Item0000, browse path Pump1/Bench/Item0000),
// so the same clients read either server.
//
//   node opcua_server.js PORT ITEMS PERIOD_MS PKI_DIR
//
// Prints "namespace <index>" and "listening <endpoint>" once it serves, then "offered <n> <seconds>"
// every second: the changes it made (each one a new value with a new source timestamp), so the
// offer is observed, not assumed.  Security None only: the benchmark measures the data path, not the handshake.
"use strict";
const path = require("path");
const {
  OPCUAServer,
  DataType,
  Variant,
  StatusCodes,
  OPCUACertificateManager,
  MessageSecurityMode,
  SecurityPolicy,
} = require("node-opcua");

async function main() {
  const [port, items, periodMs, pkiDir] = process.argv.slice(2);
  const n = parseInt(items, 10);
  const period = parseFloat(periodMs);
  const serverCertificateManager = new OPCUACertificateManager({
    automaticallyAcceptUnknownCertificate: true,
    rootFolder: path.join(pkiDir, "pki"),
  });
  const server = new OPCUAServer({
    port: parseInt(port, 10),
    hostname: "127.0.0.1",
    alternateHostname: ["127.0.0.1"],
    resourcePath: "",
    serverCertificateManager,
    securityPolicies: [SecurityPolicy.None],
    securityModes: [MessageSecurityMode.None],
    allowAnonymous: true,
    serverCapabilities: {
      maxSessions: 10,
      maxMonitoredItemsPerSubscription: 100000,
      operationLimits: { maxMonitoredItemsPerCall: 100000, maxNodesPerRead: 100000, maxNodesPerBrowse: 100000 },
    },
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const ns = addressSpace.registerNamespace("urn:edgetwin:plcsim");
  const pump = ns.addFolder(addressSpace.rootFolder.objects, { browseName: "Pump1", nodeId: "s=Pump1" });
  const bench = ns.addFolder(pump, { browseName: "Bench", nodeId: "s=Pump1.Bench" });
  const vars = [];
  for (let i = 0; i < n; i++) {
    const name = "Item" + String(i).padStart(4, "0");
    vars.push(
      ns.addVariable({
        componentOf: bench,
        browseName: name,
        nodeId: "s=Pump1.Bench." + name,
        dataType: "Double",
        minimumSamplingInterval: 0,
        value: new Variant({ dataType: DataType.Double, value: 0 }),
      })
    );
  }
  await server.start();
  process.stdout.write("namespace " + ns.index + "\n");
  process.stdout.write("listening " + server.getEndpointUrl() + "\n");
  let tick = 0;
  let offered = 0;
  const t0 = Date.now();
  // Every variable gets a distinct value each period; the sine keeps values plausible and
  // distinct from the last, so no server-side filter can fold two changes into one.
  setInterval(() => {
    tick += 1;
    const now = new Date();
    for (let i = 0; i < n; i++) {
      vars[i].setValueFromSource(
        new Variant({ dataType: DataType.Double, value: Math.sin(tick * 0.1 + i) * 10 + tick * 1e-6 }),
        StatusCodes.Good,
        now
      );
    }
    offered += n;
  }, period);
  setInterval(() => {
    process.stdout.write("offered " + offered + " " + ((Date.now() - t0) / 1000).toFixed(3) + "\n");
  }, 1000);
  const stop = async () => {
    await server.shutdown(100);
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  process.stderr.write("opcua_server.js: " + (err && err.stack ? err.stack : err) + "\n");
  process.exit(1);
});
