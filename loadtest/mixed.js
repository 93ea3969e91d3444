// Mixed traffic, all at once through the load balancer: signups, signins,
// group/me reads and a trickle of expected errors (409 duplicate username,
// 401 without a token, 422 invalid body; counted as expected, not failed).
//
//   SIGNUP_RATE (default 30/s)  SIGNIN_RATE (15/s)  READ_RATE (300/s)
//   NEG_RATE (2/s)  DURATION (default 60s)  USERS in setup (default 100)
//   P95_MS / P99_MS for signup+signin (default 500 / 1000),
//   READ_P95_MS / READ_P99_MS for reads (default 100 / 250)
import * as c from './lib/common.js';

const DURATION = __ENV.DURATION || '60s';

function rate(name, def, maxVUs) {
  return {
    executor: 'constant-arrival-rate',
    rate: Number(__ENV[name] || def),
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: Math.min(20, maxVUs),
    maxVUs,
    gracefulStop: '10s',
  };
}

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  setupTimeout: '120s',
  scenarios: {
    signup: Object.assign(rate('SIGNUP_RATE', 30, 150), { exec: 'doSignup' }),
    signin: Object.assign(rate('SIGNIN_RATE', 15, 100), { exec: 'doSignin' }),
    reads: Object.assign(rate('READ_RATE', 300, 150), { exec: 'doRead' }),
    negative: Object.assign(rate('NEG_RATE', 2, 10), { exec: 'doNegative' }),
  },
  thresholds: {
    http_req_failed: [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '10s' }],
    checks: ['rate>0.99'],
    'http_req_duration{scenario:signup}': [`p(95)<${__ENV.P95_MS || 500}`, `p(99)<${__ENV.P99_MS || 1000}`],
    'http_req_duration{scenario:signin}': [`p(95)<${__ENV.P95_MS || 500}`, `p(99)<${__ENV.P99_MS || 1000}`],
    'http_req_duration{scenario:reads}': [`p(95)<${__ENV.READ_P95_MS || 100}`, `p(99)<${__ENV.READ_P99_MS || 250}`],
    'http_req_duration{scenario:negative}': ['p(95)<1000'],
    'http_req_failed{scenario:signup}': ['rate<0.01'],
    'http_req_failed{scenario:signin}': ['rate<0.01'],
    'http_req_failed{scenario:reads}': ['rate<0.01'],
    'http_req_failed{scenario:negative}': ['rate<0.01'],
    'http_reqs{scenario:signup}': ['count>0'],
    'http_reqs{scenario:signin}': ['count>0'],
    'http_reqs{scenario:reads}': ['count>0'],
    'http_reqs{scenario:negative}': ['count>0'],
  },
};

export function setup() {
  const runId = c.newRunId();
  return { runId, users: c.makeUsers(runId, Number(__ENV.USERS || 100), 'm') };
}

function anyUser(data) {
  return data.users[Math.floor(Math.random() * data.users.length)];
}

export function doSignup(data) {
  c.checkSignup(c.signup(c.uniqueUsername(data.runId, 'ms'), c.randomAttributes()));
}

export function doSignin(data) {
  c.checkSignin(c.signin(anyUser(data).username));
}

export function doRead(data) {
  const u = anyUser(data);
  if (Math.random() < 0.85) c.getGroup(u.token); else c.getMe(u.token);
}

export function doNegative(data) {
  c.negativeChecks(anyUser(data).username);
}

export function handleSummary(data) {
  return c.summarize('mixed', data);
}
