// Soak: steady mixed load (signups, sign-ins, reads, a page walk through the
// caller's group) for a long time, to find what only time shows: latency or
// errors that drift upwards, memory that grows (loadtest/run soak samples
// the replicas' process_resident_memory_bytes at the start and end of the
// steady phase and fails past a bound), connections or file descriptors that
// leak.
//
// The run is cut into windows by elapsed time: `warmup` (not judged),
// `early` (from WARMUP to a third of DURATION), `mid`, and `late` (the last
// third). Every request is tagged with its window. Thresholds hold the
// early and late windows to the same absolute bounds; handleSummary then
// compares late with early and records a drift failure in the summary JSON
// (`soak_drift.failed`), which loadtest/run turns into a failed run.
//
//   DURATION      steady-load time (default 30m; `loadtest/run soak` with DURATION=1m for a quick look)
//   WARMUP        excluded from the early window (default: a sixth of DURATION, at most 5m)
//   SIGNUP_RATE (default 8/s)  SIGNIN_RATE (4/s)  READ_RATE (80/s)  USERS in setup (default 100)
//   P99_MS        p99 bound for signup/signin in any judged window (default 1000)
//   READ_P99_MS   p99 bound for reads in any judged window (default 250)
//   ERROR_RATE    failed-request bound in any judged window (default 0.01)
//   DRIFT_RATIO   late p99 may be at most this times early p99 ... (default 1.5)
//   DRIFT_MIN_MS  ... plus this slack, so that tiny p99s do not fail on noise (default 25)
//   DRIFT_ERRORS  late error rate may exceed early's by at most this (default 0.005)
import exec from 'k6/execution';
import * as c from './lib/common.js';

const DURATION = __ENV.DURATION || '30m';

// k6 durations as seconds ("1h30m", "90s", "2m", "500ms").
export function seconds(d) {
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let m;
  let matched = '';
  while ((m = re.exec(d)) !== null) {
    matched += m[0];
    total += Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2]];
  }
  if (!matched || matched !== String(d)) throw new Error(`not a duration: ${d}`);
  return total;
}

const TOTAL_S = seconds(DURATION);
const WARMUP_S = __ENV.WARMUP ? seconds(__ENV.WARMUP) : Math.min(300, TOTAL_S / 6);
const P99 = Number(__ENV.P99_MS || 1000);
const READ_P99 = Number(__ENV.READ_P99_MS || 250);
const ERRORS = Number(__ENV.ERROR_RATE || 0.01);

function rate(name, def, maxVUs, execName) {
  return {
    executor: 'constant-arrival-rate',
    exec: execName,
    rate: Number(__ENV[name] || def),
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: Math.min(10, maxVUs),
    maxVUs,
    gracefulStop: '10s',
  };
}

const thresholds = {
  checks: ['rate>0.99'],
  // Abort early only on a collapse; drift is judged at the end.
  http_req_failed: [{ threshold: 'rate<0.05', abortOnFail: true, delayAbortEval: '30s' }],
  'http_reqs{window:late}': ['count>0'],
};
['early', 'late'].forEach((w) => {
  thresholds[`http_req_duration{window:${w},kind:write}`] = [`p(99)<${P99}`];
  thresholds[`http_req_duration{window:${w},kind:read}`] = [`p(99)<${READ_P99}`];
  thresholds[`http_req_failed{window:${w}}`] = [`rate<${ERRORS}`];
});

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  setupTimeout: '120s',
  scenarios: {
    signup: rate('SIGNUP_RATE', 8, 60, 'doSignup'),
    signin: rate('SIGNIN_RATE', 4, 40, 'doSignin'),
    reads: rate('READ_RATE', 80, 80, 'doRead'),
  },
  thresholds,
};

// The window of this moment, and the request kind, as VU-wide tags: every
// metric the iteration emits carries them.
function tagWindow(kind) {
  const t = (Date.now() - exec.scenario.startTime) / 1000;
  let w = 'mid';
  if (t < WARMUP_S) w = 'warmup';
  else if (t < TOTAL_S / 3) w = 'early';
  else if (t >= (2 * TOTAL_S) / 3) w = 'late';
  exec.vu.metrics.tags.window = w;
  exec.vu.metrics.tags.kind = kind;
}

export function setup() {
  const runId = c.newRunId();
  return { runId, users: c.makeUsers(runId, Number(__ENV.USERS || 100), 'k') };
}

function anyUser(data) {
  return data.users[Math.floor(Math.random() * data.users.length)];
}

export function doSignup(data) {
  tagWindow('write');
  c.checkSignup(c.signup(c.uniqueUsername(data.runId, 'ks'), c.randomAttributes()));
}

export function doSignin(data) {
  tagWindow('write');
  c.checkSignin(c.signin(anyUser(data).username));
}

export function doRead(data) {
  tagWindow('read');
  const u = anyUser(data);
  const r = Math.random();
  if (r < 0.8) c.getGroup(u.token);
  else if (r < 0.9) c.getMe(u.token);
  else c.walkGroup(u.token, 20);
}

function driftReport(data) {
  const m = data.metrics;
  const get = (name, stat) => (m[name] && m[name].values ? m[name].values[stat] : undefined);
  const ratio = Number(__ENV.DRIFT_RATIO || 1.5);
  const slack = Number(__ENV.DRIFT_MIN_MS || 25);
  const errSlack = Number(__ENV.DRIFT_ERRORS || 0.005);
  const problems = [];
  const compare = {};
  ['write', 'read'].forEach((k) => {
    const early = get(`http_req_duration{window:early,kind:${k}}`, 'p(99)');
    const late = get(`http_req_duration{window:late,kind:${k}}`, 'p(99)');
    const bound = early === undefined ? undefined : early * ratio + slack;
    compare[`${k}_p99_ms`] = { early, late, bound };
    if (early === undefined || late === undefined) problems.push(`${k}: no p99 for the early or late window`);
    else if (late > bound) problems.push(`${k} p99 drifted: late ${late.toFixed(1)} ms > ${ratio} x early ${early.toFixed(1)} ms + ${slack} ms`);
  });
  const e0 = get('http_req_failed{window:early}', 'rate');
  const e1 = get('http_req_failed{window:late}', 'rate');
  compare.error_rate = { early: e0, late: e1, bound: e0 === undefined ? undefined : e0 + errSlack };
  if (e0 === undefined || e1 === undefined) problems.push('no error rate for the early or late window');
  else if (e1 > e0 + errSlack) problems.push(`error rate drifted: late ${(100 * e1).toFixed(2)}% > early ${(100 * e0).toFixed(2)}% + ${(100 * errSlack).toFixed(2)}%`);
  return {
    failed: problems.length > 0, problems, compare,
    windows: { warmup_s: WARMUP_S, early_until_s: TOTAL_S / 3, late_from_s: (2 * TOTAL_S) / 3, total_s: TOTAL_S },
  };
}

export function handleSummary(data) {
  const drift = driftReport(data);
  const out = c.summarize('soak', data, { soak_drift: drift });
  const lines = [`   drift (late vs early): ${drift.failed ? 'FAILED' : 'none'}`];
  drift.problems.forEach((p) => lines.push(`     ${p}`));
  Object.entries(drift.compare).forEach(([k, v]) => {
    const f = (x) => (x === undefined ? '-' : (k === 'error_rate' ? `${(100 * x).toFixed(2)}%` : `${x.toFixed(1)}ms`));
    lines.push(`     ${k.padEnd(14)} early ${f(v.early)}  late ${f(v.late)}  bound ${f(v.bound)}`);
  });
  out.stdout += `${lines.join('\n')}\n`;
  return out;
}
