// Drives Debian's chromium through the status page; prints one JSON line per step for the test.
// Usage: node statuspage.mjs <url> <screenshot-dir>   (stdin: a line "alarm" once the test raised one)
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [url, shots] = process.argv.slice(2);
const say = (step, data) => process.stdout.write(JSON.stringify({ step, ...data }) + "\n");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
// A navigation chromium aborts because the network changed under it (an address settling in the
// test's fresh namespace) is tried again, as a user would reload; anything else fails the step.
async function open(page, target) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await page.goto(target);
    } catch (err) {
      if (attempt >= 3 || !String(err).includes("ERR_NETWORK_CHANGED")) throw err;
      process.stderr.write(`statuspage: ${target}: network changed, attempt ${attempt + 1}\n`);
      await new Promise(done => setTimeout(done, 500));
    }
  }
}

try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();

  // Without the token: refused.
  const refused = await open(page, url.replace(/\?token=.*$/, ""));
  say("without-token", { status: refused.status(), text: (await page.textContent("body")).trim() });

  // With it: the page loads and goes live.
  const loaded = await open(page, url);
  await page.waitForFunction(() => document.getElementById("badge").className !== "", null, { timeout: 20000 });
  await page.waitForSelector("tr.stream", { timeout: 20000 });
  const values = async () => page.$$eval("tr.stream", rows => rows.map(r => [r.dataset.key, r.querySelector(".value").textContent]));
  const first = await values();
  await page.waitForFunction(
    (before) => {
      const now = [...document.querySelectorAll("tr.stream")].map(r => r.querySelector(".value").textContent);
      return now.some((v, i) => before[i] !== undefined && v !== before[i][1]);
    },
    first, { timeout: 20000 });
  const second = await values();
  await page.waitForFunction(() => document.querySelectorAll("svg.trend polyline").length > 0, null, { timeout: 20000 });
  const points = await page.$$eval("svg.trend polyline", ps => ps.map(p => p.getAttribute("points").split(" ").length));
  // A few seconds of trend in the committed screenshot; a short look otherwise.
  await page.waitForTimeout(process.env.EDGETWIN_UPDATE_SCREENSHOTS ? 4000 : 1000);
  await page.screenshot({ path: `${shots}/status-page.png`, fullPage: true });
  say("live", {
    status: loaded.status(),
    badge: await page.textContent("#badge"),
    headline: await page.textContent("#headline"),
    first, second, points,
    html: await page.content(),
  });

  // The test raises an alarm; the page must list it.
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) { if (line.trim() === "alarm") break; }
  await page.waitForSelector("tr.alarm", { timeout: 30000 });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: `${shots}/status-page-alarm.png`, fullPage: true });
  say("alarm", {
    alarms: await page.$$eval("tr.alarm", rows => rows.map(r => [...r.cells].map(c => c.textContent))),
    badge: await page.textContent("#badge"),
    headline: await page.textContent("#headline"),
  });
} finally {
  await browser.close();
}
