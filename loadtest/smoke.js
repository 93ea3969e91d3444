// Smoke: every endpoint a user touches, at low rates, for ~20 s. CI runs it
// through loadtest/run smoke (bring-up + k6 + teardown under two minutes).
//
//   DURATION (default 20s)
import * as c from './lib/common.js';

const DURATION = __ENV.DURATION || '20s';

function rate(r, maxVUs, exec) {
  return {
    executor: 'constant-arrival-rate', rate: r, timeUnit: '1s', duration: DURATION,
    preAllocatedVUs: Math.min(5, maxVUs), maxVUs, gracefulStop: '10s', exec,
  };
}

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  setupTimeout: '60s',
  scenarios: {
    signup: rate(5, 20, 'doSignup'),
    signin: rate(2, 10, 'doSignin'),
    reads: rate(30, 20, 'doRead'),
    negative: rate(1, 5, 'doNegative'),
  },
  thresholds: {
    http_req_failed: [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '5s' }],
    checks: ['rate>0.99'],
    'http_req_duration{scenario:signup}': ['p(95)<1000', 'p(99)<2000'],
    'http_req_duration{scenario:signin}': ['p(95)<1000', 'p(99)<2000'],
    'http_req_duration{scenario:reads}': ['p(95)<250', 'p(99)<500'],
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
  return { runId, users: c.makeUsers(runId, 10, 'k') };
}

const anyUser = (data) => data.users[Math.floor(Math.random() * data.users.length)];

export function doSignup(data) {
  c.checkSignup(c.signup(c.uniqueUsername(data.runId, 'ks'), c.randomAttributes()));
}

export function doSignin(data) {
  c.checkSignin(c.signin(anyUser(data).username));
}

export function doRead(data) {
  const u = anyUser(data);
  if (Math.random() < 0.8) c.getGroup(u.token, 50); else c.getMe(u.token);
}

export function doNegative(data) {
  c.negativeChecks(anyUser(data).username);
}

export function handleSummary(data) {
  return c.summarize('smoke', data);
}
