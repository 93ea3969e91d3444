// Shared helpers for cohort's k6 scripts (k6 v1.1.0, see requirements.txt).
//
// Environment:
//   BASE_URL       the load balancer (default http://127.0.0.1:18080; loopback only)
//   SUMMARY_JSON   where handleSummary writes the JSON summary
//                  (default loadtest/results/<scenario>-summary.json, relative to cwd)
//   RUN_ID         prefix for generated usernames (default: random per run)
import http from 'k6/http';
import exec from 'k6/execution';
import { check, fail } from 'k6';
import { Counter, Trend } from 'k6/metrics';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:18080').replace(/\/+$/, '');
if (!/^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$/.test(BASE_URL)) {
  fail(`BASE_URL ${BASE_URL} is not a loopback address: load tests here only target this machine`);
}

const JSON_HEADERS = { 'Content-Type': 'application/json' };

export const signupsJoined = new Counter('cohort_signups_joined');
export const signupsFounded = new Counter('cohort_signups_founded');
export const groupSize = new Trend('cohort_group_member_count');

// Every summary shows these, so RESULTS.md can quote p50/p95/p99.
export const SUMMARY_TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];

// ---------------------------------------------------------------- identities
export function newRunId() {
  // 6 chars of [a-z0-9]; usernames stay well under the 32-char limit.
  return (__ENV.RUN_ID || Math.random().toString(36).slice(2, 8)).toLowerCase().replace(/[^a-z0-9]/g, '').slice(0, 8);
}

// Unique per iteration across all VUs of the test: run id + scenario tag +
// iterationInTest (unique within a scenario).
export function uniqueUsername(runId, tag) {
  return `${tag}${runId}.${exec.scenario.iterationInTest}`.slice(0, 32);
}

export function passwordFor(username) {
  // 15..128 chars, deterministic so signin can reuse it.
  return `pw-${username}-correct-horse-battery`;
}

// ---------------------------------------------------------------- attributes
// A realistic mix: a few very popular values per category (Zipf-like), many
// rare ones, 4..9 attributes per user, occasional odd casing and spacing that
// cohort canonicalises (NFKC, trim, fold spaces, lower-case).
const CATEGORIES = {
  role: ['Software Engineer', 'Designer', 'Product Manager', 'Data Scientist', 'Nurse', 'Teacher', 'Accountant',
    'Sales', 'Marketing', 'Lawyer', 'Chef', 'Electrician', 'Student', 'Researcher', 'Photographer', 'Pilot',
    'Architect', 'Pharmacist', 'Journalist', 'Mechanic'],
  city: ['Brussels', 'Paris', 'Berlin', 'Amsterdam', 'Madrid', 'Lisbon', 'Rome', 'Vienna', 'Prague', 'Warsaw',
    'Dublin', 'Copenhagen', 'Stockholm', 'Oslo', 'Helsinki', 'Zurich', 'Milan', 'Lyon', 'Munich', 'Antwerp',
    'Ghent', 'Porto', 'Seville', 'Krakow', 'Budapest', 'Athens', 'Tallinn', 'Riga', 'Vilnius', 'Sofia'],
  country: ['Belgium', 'France', 'Germany', 'Netherlands', 'Spain', 'Portugal', 'Italy', 'Austria', 'Czechia',
    'Poland', 'Ireland', 'Denmark'],
  seniority: ['Junior', 'Mid', 'Senior', 'Lead'],
  interest: ['Gamer', 'Hiking', 'Cycling', 'Chess', 'Jazz', 'Cooking', 'Running', 'Climbing', 'Photography',
    'Board Games', 'Yoga', 'Sailing', 'Football', 'Tennis', 'Reading', 'Gardening', 'Painting', 'Skiing',
    'Swimming', 'Podcasts', 'Anime', 'Baking', 'Birdwatching', 'Camping', 'Coffee', 'Dancing', 'Fishing',
    'Knitting', 'Meditation', 'Surfing', 'Travel', 'Volunteering', 'Wine', 'Woodworking', 'Astronomy',
    'Cinema', 'Theatre', 'Opera', 'Poetry', 'Rugby'],
  language: ['English', 'French', 'Dutch', 'German', 'Spanish', 'Portuguese', 'Italian', 'Polish'],
};

// Zipf-like pick: index ~ floor(n * u^s), s > 1 skews towards the first items.
function zipfPick(list, skew) {
  return list[Math.min(list.length - 1, Math.floor(list.length * Math.pow(Math.random(), skew)))];
}

function noisy(s) {
  const r = Math.random();
  if (r < 0.05) return `  ${s.toUpperCase()} `;
  if (r < 0.10) return s.replace(' ', '   ');
  if (r < 0.20) return s.toLowerCase();
  return s;
}

export function randomAttributes() {
  const attrs = new Set();
  attrs.add(zipfPick(CATEGORIES.role, 2.2));
  attrs.add(zipfPick(CATEGORIES.city, 2.5));
  attrs.add(zipfPick(CATEGORIES.country, 2.0));
  if (Math.random() < 0.8) attrs.add(zipfPick(CATEGORIES.seniority, 1.5));
  const interests = 1 + Math.floor(Math.random() * 4);
  for (let i = 0; i < interests; i++) attrs.add(zipfPick(CATEGORIES.interest, 2.0));
  if (Math.random() < 0.5) attrs.add(zipfPick(CATEGORIES.language, 1.8));
  return Array.from(attrs).map(noisy);
}

// ---------------------------------------------------------------- API calls
export function signup(username, attributes, params = {}) {
  const res = http.post(`${BASE_URL}/v1/signup`,
    JSON.stringify({ username, password: passwordFor(username), attributes }),
    Object.assign({ headers: JSON_HEADERS, tags: { name: 'POST /v1/signup' } }, params));
  return res;
}

export function checkSignup(res) {
  let body = null;
  try { body = res.json(); } catch (e) { body = null; }
  const ok = check(res, {
    'signup 201': (r) => r.status === 201,
    'signup has a group': () => body !== null && body.group && Number.isInteger(body.group.id),
  });
  if (ok && body.group) {
    if (body.group.created) signupsFounded.add(1); else signupsJoined.add(1);
  }
  return ok ? body : null;
}

export function signin(username, params = {}) {
  return http.post(`${BASE_URL}/v1/signin`,
    JSON.stringify({ username, password: passwordFor(username) }),
    Object.assign({ headers: JSON_HEADERS, tags: { name: 'POST /v1/signin' } }, params));
}

export function checkSignin(res) {
  let body = null;
  try { body = res.json(); } catch (e) { body = null; }
  const ok = check(res, {
    'signin 200': (r) => r.status === 200,
    'signin returns a bearer token': () => body !== null && body.token_type === 'Bearer' && !!body.access_token,
  });
  return ok ? body.access_token : null;
}

export function getGroup(token, limit) {
  const q = limit ? `?limit=${limit}` : '';
  const res = http.get(`${BASE_URL}/v1/me/group${q}`,
    { headers: { Authorization: `Bearer ${token}` }, tags: { name: 'GET /v1/me/group' } });
  let body = null;
  try { body = res.json(); } catch (e) { body = null; }
  const ok = check(res, {
    'group 200': (r) => r.status === 200,
    'group lists members': () => body !== null && body.group && Array.isArray(body.members) && body.members.length >= 1,
  });
  if (ok) groupSize.add(body.group.member_count);
  return res;
}

// One page of the caller's group: GET /v1/me/group?limit=&cursor=.
export function groupPage(token, limit, cursor) {
  const q = [];
  if (limit) q.push(`limit=${limit}`);
  if (cursor) q.push(`cursor=${encodeURIComponent(cursor)}`);
  const res = http.get(`${BASE_URL}/v1/me/group${q.length ? `?${q.join('&')}` : ''}`,
    { headers: { Authorization: `Bearer ${token}` }, tags: { name: 'GET /v1/me/group (page)' } });
  let body = null;
  try { body = res.json(); } catch (e) { body = null; }
  return { res, body };
}

export const groupPages = new Counter('cohort_group_pages');
export const groupWalk = new Trend('cohort_group_walk_duration', true);

// Page through the caller's whole group, following next_cursor until it is
// null (at most maxPages pages). Checks every page answers 200, no member is
// listed twice, and the walk sees at least the member_count of its first
// page (members only join during a load test; new ones appear at the end).
// Returns the number of members seen, or -1 on a failed page.
export function walkGroup(token, limit, maxPages = 200) {
  const t0 = Date.now();
  const seen = new Set();
  let cursor = null;
  let expected = null;
  let pages = 0;
  let dup = false;
  do {
    const { res, body } = groupPage(token, limit, cursor);
    pages += 1;
    groupPages.add(1);
    const ok = check(res, {
      'page 200': (r) => r.status === 200,
      'page lists members': () => body !== null && Array.isArray(body.members),
    });
    if (!ok) return -1;
    if (expected === null) expected = body.group.member_count;
    body.members.forEach((m) => { if (seen.has(m.user_id)) dup = true; seen.add(m.user_id); });
    cursor = body.next_cursor;
  } while (cursor && pages < maxPages);
  groupWalk.add(Date.now() - t0);
  check(null, {
    'walk: no member listed twice': () => !dup,
    'walk: every member seen': () => seen.size >= expected,
    'walk: ended on a null next_cursor': () => !cursor,
  });
  return seen.size;
}

export function getMe(token) {
  const res = http.get(`${BASE_URL}/v1/me`,
    { headers: { Authorization: `Bearer ${token}` }, tags: { name: 'GET /v1/me' } });
  check(res, { 'me 200': (r) => r.status === 200 });
  return res;
}

// Expected-error traffic: counted as success by http_req_failed.
export function negativeChecks(existingUsername) {
  const dup = signup(existingUsername, ['alpha', 'beta', 'gamma'],
    { responseCallback: http.expectedStatuses(409), tags: { name: 'POST /v1/signup (duplicate)' } });
  check(dup, { 'duplicate signup 409': (r) => r.status === 409 });
  const anon = http.get(`${BASE_URL}/v1/me/group`,
    { responseCallback: http.expectedStatuses(401), tags: { name: 'GET /v1/me/group (no token)' } });
  check(anon, { 'no token 401': (r) => r.status === 401 });
  const bad = http.post(`${BASE_URL}/v1/signup`, JSON.stringify({ username: 'x', password: 'short', attributes: [] }),
    { headers: JSON_HEADERS, responseCallback: http.expectedStatuses(422, 400), tags: { name: 'POST /v1/signup (invalid)' } });
  check(bad, { 'invalid signup 422': (r) => r.status === 422 || r.status === 400 });
}

// setup(): n users signed up and signed in, in parallel batches.
export function makeUsers(runId, n, tag = 's') {
  const users = [];
  for (let start = 0; start < n; start += 20) {
    const names = [];
    for (let i = start; i < Math.min(n, start + 20); i++) names.push(`${tag}${runId}.setup${i}`);
    const signups = http.batch(names.map((u) => ['POST', `${BASE_URL}/v1/signup`,
      JSON.stringify({ username: u, password: passwordFor(u), attributes: randomAttributes() }),
      { headers: JSON_HEADERS, tags: { name: 'POST /v1/signup (setup)' } }]));
    signups.forEach((r, i) => { if (r.status !== 201) fail(`setup signup ${names[i]}: ${r.status} ${r.body}`); });
    const signins = http.batch(names.map((u) => ['POST', `${BASE_URL}/v1/signin`,
      JSON.stringify({ username: u, password: passwordFor(u) }),
      { headers: JSON_HEADERS, tags: { name: 'POST /v1/signin (setup)' } }]));
    signins.forEach((r, i) => {
      if (r.status !== 200) fail(`setup signin ${names[i]}: ${r.status} ${r.body}`);
      users.push({ username: names[i], token: r.json('access_token') });
    });
  }
  return users;
}

// setup(): one group of n members (all sign up with the same six attributes,
// unique to the run, so they share more than any threshold), and tokens for
// the first `readers` of them.
export function makeBigGroup(runId, n, readers, tag = 'b') {
  const attrs = ['a', 'b', 'c', 'd', 'e', 'f'].map((x) => `big ${runId} ${x}`);
  const names = [];
  for (let i = 0; i < n; i++) names.push(`${tag}${runId}.big${i}`);
  let groupId = null;
  for (let start = 0; start < n; start += 20) {
    const batch = names.slice(start, start + 20);
    // The founder first, alone, so that the others all join its group.
    const parts = start === 0 ? [batch.slice(0, 1), batch.slice(1)] : [batch];
    parts.forEach((part) => {
      if (!part.length) return;
      const res = http.batch(part.map((u) => ['POST', `${BASE_URL}/v1/signup`,
        JSON.stringify({ username: u, password: passwordFor(u), attributes: attrs }),
        { headers: JSON_HEADERS, tags: { name: 'POST /v1/signup (setup)' } }]));
      res.forEach((r, i) => {
        if (r.status !== 201) fail(`setup big-group signup ${part[i]}: ${r.status} ${r.body}`);
        const g = r.json('group.id');
        if (groupId === null) groupId = g;
        if (g !== groupId) fail(`setup big-group signup ${part[i]} joined group ${g}, not ${groupId}`);
      });
    });
  }
  const tokens = [];
  const who = names.slice(0, Math.min(readers, n));
  const signins = http.batch(who.map((u) => ['POST', `${BASE_URL}/v1/signin`,
    JSON.stringify({ username: u, password: passwordFor(u) }),
    { headers: JSON_HEADERS, tags: { name: 'POST /v1/signin (setup)' } }]));
  signins.forEach((r, i) => {
    if (r.status !== 200) fail(`setup big-group signin ${who[i]}: ${r.status} ${r.body}`);
    tokens.push(r.json('access_token'));
  });
  return { groupId, size: n, tokens };
}

// ---------------------------------------------------------------- summary
function fmtMs(v) { return v === undefined ? '-' : `${v.toFixed(1)}ms`; }

// Figures per scenario (and overall): requests/s, p50/p95/p99, error rate.
export function figures(data) {
  const m = data.metrics;
  const dur = data.state.testRunDurationMs / 1000;
  const out = {};
  const scen = new Set();
  Object.keys(m).forEach((k) => { const x = /\{scenario:([^}]+)\}/.exec(k); if (x) scen.add(x[1]); });
  const pick = (suffix) => {
    const d = m[`http_req_duration${suffix}`];
    const reqs = m[`http_reqs${suffix}`];
    const failed = m[`http_req_failed${suffix}`];
    if (!d) return null;
    return {
      requests: reqs ? reqs.values.count : d.values.count,
      rps: reqs ? (suffix ? reqs.values.count / dur : reqs.values.rate) : undefined,
      p50_ms: d.values.med, p95_ms: d.values['p(95)'], p99_ms: d.values['p(99)'], max_ms: d.values.max,
      error_rate: failed ? failed.values.rate : undefined,
    };
  };
  out.all = pick('');
  scen.forEach((s) => { const f = pick(`{scenario:${s}}`); if (f) out[s] = f; });
  return { duration_s: dur, scenarios: out };
}

export function summarize(name, data, extra = {}) {
  const path = __ENV.SUMMARY_JSON || `loadtest/results/${name}-summary.json`;
  const fig = figures(data);
  const lines = [`\n== cohort k6 ${name}: ${fig.duration_s.toFixed(1)} s against ${BASE_URL}`];
  Object.entries(fig.scenarios).forEach(([s, f]) => {
    lines.push(`   ${s.padEnd(14)} ${String(f.requests).padStart(7)} req  ${f.rps !== undefined ? f.rps.toFixed(1) : '-'} req/s  ` +
      `p50 ${fmtMs(f.p50_ms)}  p95 ${fmtMs(f.p95_ms)}  p99 ${fmtMs(f.p99_ms)}  max ${fmtMs(f.max_ms)}  ` +
      `errors ${f.error_rate !== undefined ? (100 * f.error_rate).toFixed(2) + '%' : '-'}`);
  });
  const m = data.metrics;
  if (m.cohort_signups_joined || m.cohort_signups_founded) {
    lines.push(`   signups: joined ${m.cohort_signups_joined ? m.cohort_signups_joined.values.count : 0}, ` +
      `founded ${m.cohort_signups_founded ? m.cohort_signups_founded.values.count : 0}`);
  }
  if (m.checks) lines.push(`   checks: ${(100 * m.checks.values.rate).toFixed(2)}% passed`);
  const failedTh = [];
  Object.entries(m).forEach(([k, v]) => {
    Object.entries(v.thresholds || {}).forEach(([t, r]) => { if (!r.ok) failedTh.push(`${k}: ${t}`); });
  });
  lines.push(failedTh.length ? `   THRESHOLDS FAILED:\n     ${failedTh.join('\n     ')}` : '   thresholds: all passed');
  lines.push(`   summary JSON: ${path}\n`);
  const out = { stdout: lines.join('\n') };
  out[path] = JSON.stringify(Object.assign({ scenario: name, base_url: BASE_URL, figures: fig, thresholds_failed: failedTh },
    extra, { k6: data }), null, 2);
  return out;
}
