// Read-heavy: signed-in users fetch their group (90%) and themselves (10%),
// at an open-model arrival rate, through the load balancer. Alongside, the
// `pages` scenario has members of one big group (hundreds of members) page
// through all of it, following next_cursor until it is null, and checks
// that no member is listed twice and every member is seen.
//
//   USERS       users created (and signed in) in setup (default 200)
//   RATE        reads/s at the plateau (default 600)
//   RAMP        ramp-up time (default 20s)   HOLD  plateau time (default 60s)
//   MAX_VUS     VU ceiling (default 200)
//   P95_MS / P99_MS  latency thresholds for reads and pages (default 100 / 250)
//   BIG_GROUP   members of the big group made in setup (default 300; 0: no pages scenario)
//   PAGE_LIMIT  members per page in the walk (default 50)
//   WALK_RATE   whole-group walks/s (default 2)
import { check } from 'k6';
import * as c from './lib/common.js';

const RATE = Number(__ENV.RATE || 600);
const BIG_GROUP = Number(__ENV.BIG_GROUP === undefined ? 300 : __ENV.BIG_GROUP);
const PAGE_LIMIT = Number(__ENV.PAGE_LIMIT || 50);
const RAMP = __ENV.RAMP || '20s';
const HOLD = __ENV.HOLD || '60s';

const scenarios = {
  reads: {
    executor: 'ramping-arrival-rate',
    startRate: Math.max(1, Math.round(RATE / 10)),
    timeUnit: '1s',
    preAllocatedVUs: 50,
    maxVUs: Number(__ENV.MAX_VUS || 200),
    stages: [
      { target: RATE, duration: RAMP },
      { target: RATE, duration: HOLD },
    ],
    gracefulStop: '10s',
  },
};
const thresholds = {
  http_req_failed: [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '10s' }],
  checks: ['rate>0.99'],
  'http_req_duration{scenario:reads}': [`p(95)<${__ENV.P95_MS || 100}`, `p(99)<${__ENV.P99_MS || 250}`],
  'http_reqs{scenario:reads}': ['count>0'],
  'http_req_failed{scenario:reads}': ['rate<0.01'],
};
if (BIG_GROUP > 0) {
  // Starts with the plateau: walks through a big group under the full read load.
  scenarios.pages = {
    executor: 'constant-arrival-rate',
    exec: 'walk',
    rate: Number(__ENV.WALK_RATE || 2),
    timeUnit: '1s',
    startTime: RAMP,
    duration: HOLD,
    preAllocatedVUs: 10,
    maxVUs: 40,
    gracefulStop: '10s',
  };
  thresholds['http_req_duration{scenario:pages}'] = [`p(95)<${__ENV.P95_MS || 100}`, `p(99)<${__ENV.P99_MS || 250}`];
  thresholds['http_req_failed{scenario:pages}'] = ['rate<0.01'];
  thresholds['checks{scenario:pages}'] = ['rate>0.99'];
  thresholds['http_reqs{scenario:pages}'] = ['count>0'];
  thresholds.cohort_group_pages = [`count>${Math.ceil(BIG_GROUP / PAGE_LIMIT)}`];
}

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  setupTimeout: '180s',
  scenarios,
  thresholds,
};

export function setup() {
  const runId = c.newRunId();
  const users = c.makeUsers(runId, Number(__ENV.USERS || 200), 'g');
  const big = BIG_GROUP > 0 ? c.makeBigGroup(runId, BIG_GROUP, 10, 'g') : null;
  return { runId, users, big };
}

// One member of the big group reads all of it, page by page.
export function walk(data) {
  const token = data.big.tokens[Math.floor(Math.random() * data.big.tokens.length)];
  const seen = c.walkGroup(token, PAGE_LIMIT);
  check(seen, { 'walk: the whole big group': (n) => n >= data.big.size });
}

export default function (data) {
  const u = data.users[Math.floor(Math.random() * data.users.length)];
  if (Math.random() < 0.9) {
    c.getGroup(u.token, Math.random() < 0.3 ? 10 : undefined);
  } else {
    c.getMe(u.token);
  }
}

export function handleSummary(data) {
  return c.summarize('getgroup', data);
}
