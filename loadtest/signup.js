// Signup storm: an open-model ramp of new users (ramping-arrival-rate), each
// with a realistic attribute mix, through the load balancer.
//
//   PEAK_RATE   signups/s at the peak (default 100; two cores do ~150
//               argon2id hashes/s in total, shared with k6, Postgres, Redis)
//   RAMP        duration of each ramp stage (default 30s)
//   HOLD        time at the peak (default 60s)
//   MAX_VUS     VU ceiling (default 300)
//   P95_MS / P99_MS  latency thresholds for signup (default 500 / 1000)
import * as c from './lib/common.js';

const PEAK = Number(__ENV.PEAK_RATE || 100);
const RAMP = __ENV.RAMP || '30s';
const HOLD = __ENV.HOLD || '60s';

export const options = {
  summaryTrendStats: c.SUMMARY_TREND_STATS,
  discardResponseBodies: false,
  scenarios: {
    signup: {
      executor: 'ramping-arrival-rate',
      startRate: Math.max(1, Math.round(PEAK / 10)),
      timeUnit: '1s',
      preAllocatedVUs: Math.min(100, Number(__ENV.MAX_VUS || 300)),
      maxVUs: Number(__ENV.MAX_VUS || 300),
      stages: [
        { target: Math.round(PEAK / 2), duration: RAMP },
        { target: PEAK, duration: RAMP },
        { target: PEAK, duration: HOLD },
        { target: 0, duration: '10s' },
      ],
      gracefulStop: '15s',
    },
  },
  thresholds: {
    http_req_failed: [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '10s' }],
    checks: ['rate>0.99'],
    'http_req_duration{scenario:signup}': [`p(95)<${__ENV.P95_MS || 500}`, `p(99)<${__ENV.P99_MS || 1000}`],
    'http_reqs{scenario:signup}': ['count>0'],
    'http_req_failed{scenario:signup}': ['rate<0.01'],
  },
};

export function setup() {
  return { runId: c.newRunId() };
}

export default function (data) {
  c.checkSignup(c.signup(c.uniqueUsername(data.runId, 'st'), c.randomAttributes()));
}

export function handleSummary(data) {
  return c.summarize('signup', data);
}
