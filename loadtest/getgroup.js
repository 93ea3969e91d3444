// Read-heavy: signed-in users fetch their group (90%) and themselves (10%),
// at an open-model arrival rate, through the load balancer.
//
//   USERS       users created (and signed in) in setup (default 200)
//   RATE        reads/s at the plateau (default 600)
//   RAMP        ramp-up time (default 20s)   HOLD  plateau time (default 60s)
//   MAX_VUS     VU ceiling (default 200)
//   P95_MS / P99_MS  latency thresholds for reads (default 100 / 250)
import * as c from './lib/common.js';

const RATE = Number(__ENV.RATE || 600);

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  setupTimeout: '120s',
  scenarios: {
    reads: {
      executor: 'ramping-arrival-rate',
      startRate: Math.max(1, Math.round(RATE / 10)),
      timeUnit: '1s',
      preAllocatedVUs: 50,
      maxVUs: Number(__ENV.MAX_VUS || 200),
      stages: [
        { target: RATE, duration: __ENV.RAMP || '20s' },
        { target: RATE, duration: __ENV.HOLD || '60s' },
      ],
      gracefulStop: '10s',
    },
  },
  thresholds: {
    http_req_failed: [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '10s' }],
    checks: ['rate>0.99'],
    'http_req_duration{scenario:reads}': [`p(95)<${__ENV.P95_MS || 100}`, `p(99)<${__ENV.P99_MS || 250}`],
    'http_reqs{scenario:reads}': ['count>0'],
    'http_req_failed{scenario:reads}': ['rate<0.01'],
  },
};

export function setup() {
  const runId = c.newRunId();
  return { runId, users: c.makeUsers(runId, Number(__ENV.USERS || 200), 'g') };
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
