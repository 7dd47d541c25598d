/* The decoder's compiled way (issue 13): tcp-ingestion's usual payload, decoded, checked and
 * formatted as its row of COPY text in one pass, without a Python object per JSON value.
 *
 * decode_batch(entries, max_payload_bytes, latest_ms, position_type) -> (positions, rows)
 *
 * For each entry (a stream entry's fields, as Decoder.decode_batch takes them), either the
 * Position that the decoder's Python ways give for it, with ``rows[i]`` its line of COPY text
 * exactly as processor.core.writer._copy_text(numbered=False) makes it; or None in both lists:
 * the compiled way declined, and the Python ways decide (the typed way, then the exact way,
 * which alone names rejections). It never rejects and never raises for an entry's content.
 *
 * It takes only a narrow, common shape and declines everything else, so that accepting is
 * always safe: a dict of at most 64 fields whose b"payload" is bytes within the size limit,
 * holding one JSON object made of printable ASCII only (so no escape, no \u0000, no control
 * character, and no whitespace but the space); CONTRACT 1's fields alone, each at most once;
 * device_id ASCII letters and digits, 1-64 of them; timestamp integer epoch milliseconds or
 * tcp-ingestion's ISO form YYYY-MM-DDTHH:MM:SS.mmmZ, inside the window; the reals as plain
 * decimals of at most 15 significant digits, no exponent, no trailing zero after the point
 * (but "x.0"), magnitudes from 1e-4 (so that repr writes the same digits, see float_literal);
 * integers of at most 18 digits; attributes an object of at most 128 distinct keys, none
 * starting with "__", whose values are integers, strings, booleans, null, the empty object or
 * the sentinels of CONTRACT 1.1 (canonical base64 only).
 *
 * Keep it in step: a change to CONTRACT 1's rules, to the decoder's Python ways or to the
 * writer's COPY text must be made here too. tests/test_speedups.py compares both ways on the
 * fuzz corpus, on mutations of realistic payloads and on every boundary named here, and fails
 * where they part.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 64
#define MAX_DEVICE_ID 64
#define MAX_BIGINT_DIGITS 100
#define MAX_EVENT_ID 2147483647LL
#define MAX_SAFE_INTEGER 9007199254740991ULL /* 2**53 - 1 */
#define MIN_EPOCH_MS 946684800000LL          /* 2000-01-01T00:00:00Z */
#define MAX_EPOCH_MS 253402300799999LL       /* 9999-12-31T23:59:59.999Z */
#define MS_PER_DAY 86400000LL

static PyObject *payload_key; /* b"payload" */

/* -- a growable byte buffer ----------------------------------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t more)
{
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more) {
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const char *s, Py_ssize_t n)
{
    if (b->len + n > b->cap && buf_grow(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int put_char(Buf *b, char ch)
{
    if (b->len == b->cap && buf_grow(b, 1) < 0) {
        return -1;
    }
    b->data[b->len++] = ch;
    return 0;
}

/* -- the JSON text: a cursor, and the few token kinds the compiled way reads ---------- */

typedef struct {
    const unsigned char *p, *end;
    int spaces; /* the payload holds a space somewhere (JSON.stringify's output has none) */
} Cur;

typedef struct {
    const char *s;
    Py_ssize_t n;
} Span;

/* Results of the readers below: taken, declined (the Python ways decide), or a Python error. */
#define OK 1
#define DECLINE 0
#define ERROR (-1)

/* The only whitespace left in a payload the compiled way reads is the space (payload_is_plain). */
static inline void skip_ws(Cur *c)
{
    if (c->spaces) {
        while (c->p < c->end && *c->p == ' ') {
            c->p++;
        }
    }
}

static inline int peek(Cur *c)
{
    skip_ws(c);
    return c->p < c->end ? *c->p : -1;
}

static inline int eat(Cur *c, char ch)
{
    if (peek(c) != ch) {
        return 0;
    }
    c->p++;
    return 1;
}

static inline int is_digit(int ch)
{
    return ch >= '0' && ch <= '9';
}

/* Every byte printable ASCII (0x20-0x7e) and none a backslash: so no escape (no \u0000 either),
 * no control character and no whitespace but the space, and a string is its bytes up to the
 * next '"'. Anything else (non-ASCII text, pretty-printed JSON, an escape) is the Python ways'. */
static int payload_is_plain(const unsigned char *s, Py_ssize_t n, int *spaces)
{
    unsigned char bad = 0, space = 0;
    for (Py_ssize_t i = 0; i < n; i++) { /* branch-free: the compiler vectorises it */
        unsigned char ch = s[i];
        bad |= (unsigned char)((unsigned char)(ch - 0x20) > 0x5e) | (unsigned char)(ch == '\\');
        space |= (unsigned char)(ch == ' ');
    }
    *spaces = space;
    return !bad;
}

/* A string's inside (the payload is plain: it ends at the next '"'). */
static int plain_string(Cur *c, Span *out)
{
    if (peek(c) != '"') {
        return DECLINE;
    }
    const unsigned char *start = ++c->p;
    const unsigned char *quote = memchr(start, '"', (size_t)(c->end - start));
    if (quote == NULL) {
        return DECLINE;
    }
    out->s = (const char *)start;
    out->n = quote - start;
    c->p = quote + 1;
    return OK;
}

#define SPAN_IS(span, text) ((span).n == (Py_ssize_t)sizeof(text) - 1 && memcmp((span).s, text, sizeof(text) - 1) == 0)

/* A literal (true, false, null). */
static int literal(Cur *c, const char *text, size_t n)
{
    skip_ws(c);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, text, n) != 0) {
        return DECLINE;
    }
    c->p += n;
    return OK;
}

/* Where a number starts (its sign, then a digit at the cursor), or NULL: no number here. */
static const unsigned char *number_start(Cur *c, int *negative)
{
    skip_ws(c);
    const unsigned char *start = c->p;
    *negative = c->p < c->end && *c->p == '-';
    c->p += *negative;
    return c->p < c->end && is_digit(*c->p) ? start : NULL;
}

/* An integer literal -?(0|[1-9][0-9]*) of at most 18 digits (it fits int64), not "-0", not
 * followed by a fraction or an exponent. ``text`` is the literal, which is also str() of it. */
static int int_literal(Cur *c, int64_t *value, Span *text)
{
    int negative;
    const unsigned char *start = number_start(c, &negative);
    if (start == NULL) {
        return DECLINE;
    }
    int64_t v = 0;
    int digits = 0;
    if (*c->p == '0') {
        c->p++;
        digits = 1;
        if (negative || (c->p < c->end && is_digit(*c->p))) {
            return DECLINE; /* "-0" (str() gives "0"), or a leading zero (invalid JSON) */
        }
    }
    else {
        while (c->p < c->end && is_digit(*c->p)) {
            if (++digits > 18) {
                return DECLINE;
            }
            v = v * 10 + (*c->p - '0');
            c->p++;
        }
    }
    if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E')) {
        return DECLINE; /* a float: the Python ways (msgspec refuses it for an integer field) */
    }
    *value = negative ? -v : v;
    text->s = (const char *)start;
    text->n = c->p - start;
    return OK;
}

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A number for a float field, taken only where repr() of its value writes the same text:
 * -?(0|[1-9][0-9]*)(.[0-9]+)? with at most 15 significant digits, no exponent, no trailing
 * zero after the point unless the whole fraction is "0", not negative zero, and, below 1, at
 * most three zeros after the point (repr writes 1e-05 for 0.00001).
 *
 * Why that is exact: the value is the significand (an integer below 10**15, exact in a double)
 * divided by a power of ten of at most 10**18 (exact too), so the one division rounds correctly
 * (Clinger's fast path), as msgspec's and orjson's parsers do. Two decimals of at most 15
 * significant digits never round to the same double (DBL_DIG is 15), so the shortest decimal
 * that round-trips, repr's, has exactly these digits; and repr writes them without an exponent
 * between 1e-4 and 1e16, with ".0" after an integral value (``dot0``). */
static int float_literal(Cur *c, double *value, Span *text, int *dot0)
{
    int negative;
    const unsigned char *start = number_start(c, &negative);
    if (start == NULL) {
        return DECLINE;
    }
    uint64_t significand = 0;
    int significant = 0, fraction = 0, int_zero = 0;
    if (*c->p == '0') {
        int_zero = 1;
        c->p++;
        if (c->p < c->end && is_digit(*c->p)) {
            return DECLINE; /* a leading zero: invalid JSON */
        }
    }
    else {
        while (c->p < c->end && is_digit(*c->p)) {
            if (++significant > 15) {
                return DECLINE;
            }
            significand = significand * 10 + (uint64_t)(*c->p - '0');
            c->p++;
        }
    }
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        const unsigned char *first = c->p;
        while (c->p < c->end && is_digit(*c->p)) {
            int digit = *c->p - '0';
            /* zeros before the first significant digit (only after "0.") are not significant */
            if ((significand != 0 || digit != 0) && ++significant > 15) {
                return DECLINE;
            }
            significand = significand * 10 + (uint64_t)digit;
            if (++fraction > 18) {
                return DECLINE; /* also bounds the power of ten below */
            }
            c->p++;
        }
        if (fraction == 0) {
            return DECLINE; /* "1." is invalid JSON */
        }
        int all_zero_fraction = 1;
        for (const unsigned char *q = first; q < c->p; q++) {
            if (*q != '0') {
                all_zero_fraction = 0;
                break;
            }
        }
        if (all_zero_fraction) {
            if (fraction != 1) {
                return DECLINE; /* "1.00": repr writes "1.0" */
            }
        }
        else {
            if (c->p[-1] == '0') {
                return DECLINE; /* "1.50": repr writes "1.5" */
            }
            if (int_zero) {
                int zeros = 0;
                while (first[zeros] == '0') {
                    zeros++;
                }
                if (zeros > 3) {
                    return DECLINE; /* below 1e-4: repr writes an exponent */
                }
            }
        }
    }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        return DECLINE;
    }
    if (negative && significand == 0) {
        return DECLINE; /* negative zero */
    }
    double v = (double)significand;
    if (fraction) {
        v /= POW10[fraction];
    }
    *value = negative ? -v : v;
    *dot0 = fraction == 0;
    text->s = (const char *)start;
    text->n = c->p - start;
    return OK;
}

/* -- timestamps ---------------------------------------------------------------------- */

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm), and back. */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int *year, int *month, int *day)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int d = (int)(doy - (153 * mp + 2) / 5 + 1);
    int m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *year = (int)(yoe + era * 400 + (m <= 2));
    *month = m;
    *day = d;
}

static int days_in_month(int year, int month)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (month == 2 && (year % 4 == 0 && (year % 100 != 0 || year % 400 == 0))) {
        return 29;
    }
    return days[month - 1];
}

static int digits_at(const char *s, int n, int *value)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!is_digit((unsigned char)s[i])) {
            return 0;
        }
        v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return 1;
}

/* tcp-ingestion's form, YYYY-MM-DDTHH:MM:SS.mmmZ, to epoch milliseconds (what fromisoformat reads). */
static int iso_ms(Span s, int64_t *ms)
{
    const char *t = s.s;
    int y, mo, d, h, mi, sec, milli;
    if (s.n != 24 || t[4] != '-' || t[7] != '-' || t[10] != 'T' || t[13] != ':' || t[16] != ':' ||
        t[19] != '.' || t[23] != 'Z') {
        return DECLINE;
    }
    if (!digits_at(t, 4, &y) || !digits_at(t + 5, 2, &mo) || !digits_at(t + 8, 2, &d) ||
        !digits_at(t + 11, 2, &h) || !digits_at(t + 14, 2, &mi) || !digits_at(t + 17, 2, &sec) ||
        !digits_at(t + 20, 3, &milli)) {
        return DECLINE;
    }
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59) {
        return DECLINE;
    }
    *ms = days_from_civil(y, mo, d) * MS_PER_DAY + ((int64_t)h * 3600 + mi * 60 + sec) * 1000 + milli;
    return OK;
}

/* -- the values of attributes --------------------------------------------------------- */

static PyObject *ascii_str(const char *s, Py_ssize_t n)
{
    PyObject *str = PyUnicode_New(n, 127);
    if (str != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(str), s, (size_t)n);
    }
    return str;
}

static const char HEX[] = "0123456789abcdef";

static int b64_value(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

/* Canonical base64 (binascii.a2b_base64 in strict mode takes it, and gives these bytes) as a
 * quoted lowercase hex string into ``text``; the hex's place in it in ``hex``. */
static int base64_hex(Span b64, Buf *text, Py_ssize_t *hex_at, Py_ssize_t *hex_len)
{
    const unsigned char *s = (const unsigned char *)b64.s;
    Py_ssize_t n = b64.n;
    if (n % 4 != 0) {
        return DECLINE;
    }
    int pad = 0;
    if (n && s[n - 1] == '=') {
        pad = (s[n - 2] == '=') ? 2 : 1;
    }
    Py_ssize_t bytes = n / 4 * 3 - pad;
    if (put_char(text, '"') < 0 || (text->len + 2 * bytes + 1 > text->cap && buf_grow(text, 2 * bytes + 1) < 0)) {
        return ERROR;
    }
    *hex_at = text->len;
    char *out = text->data + text->len;
    Py_ssize_t written = 0;
    for (Py_ssize_t i = 0; i < n; i += 4) {
        int last = i + 4 == n;
        int v[4];
        for (int k = 0; k < 4; k++) {
            if (last && k >= 4 - pad) {
                v[k] = 0;
                continue;
            }
            v[k] = b64_value(s[i + k]);
            if (v[k] < 0) {
                return DECLINE; /* '=' inside, or outside the alphabet */
            }
        }
        uint32_t group = ((uint32_t)v[0] << 18) | ((uint32_t)v[1] << 12) | ((uint32_t)v[2] << 6) | (uint32_t)v[3];
        int count = last ? 3 - pad : 3;
        if (last && pad && (group & (pad == 2 ? 0xFFFFu : 0xFFu)) != 0) {
            return DECLINE; /* bits left over after the last byte: not canonical */
        }
        for (int k = 0; k < count; k++) {
            unsigned byte = (group >> (16 - 8 * k)) & 0xFF;
            out[written++] = HEX[byte >> 4];
            out[written++] = HEX[byte & 15];
        }
    }
    text->len += written;
    *hex_len = written;
    return put_char(text, '"') < 0 ? ERROR : OK;
}

/* A Node Buffer's data, [0-255, ...], as a quoted lowercase hex string into ``text``. */
static int node_data_hex(Cur *c, Buf *text, Py_ssize_t *hex_at, Py_ssize_t *hex_len)
{
    if (!eat(c, '[') || put_char(text, '"') < 0) {
        return PyErr_Occurred() ? ERROR : DECLINE;
    }
    *hex_at = text->len;
    if (!eat(c, ']')) {
        for (;;) {
            int64_t byte;
            Span ignored;
            int r = int_literal(c, &byte, &ignored);
            if (r != OK) {
                return r;
            }
            if (byte < 0 || byte > 255) {
                return DECLINE;
            }
            char hex[2] = {HEX[byte >> 4], HEX[byte & 15]};
            if (put(text, hex, 2) < 0) {
                return ERROR;
            }
            if (eat(c, ']')) {
                break;
            }
            if (!eat(c, ',')) {
                return DECLINE;
            }
        }
    }
    *hex_len = text->len - *hex_at;
    return put_char(text, '"') < 0 ? ERROR : OK;
}

/* A __bigint's decimal string: an int when |v| <= 2**53 - 1, else its normalised decimal string. */
static int bigint_value(Span digits, Buf *text, PyObject **value)
{
    if (digits.n < 1 || digits.n > MAX_BIGINT_DIGITS) {
        return DECLINE;
    }
    for (Py_ssize_t i = 0; i < digits.n; i++) {
        if (!is_digit((unsigned char)digits.s[i])) {
            return DECLINE; /* a sign, or anything else: the exact way's pattern decides */
        }
    }
    while (digits.n > 1 && digits.s[0] == '0') {
        digits.s++;
        digits.n--;
    }
    if (digits.n <= 16) {
        uint64_t v = 0;
        for (Py_ssize_t i = 0; i < digits.n; i++) {
            v = v * 10 + (uint64_t)(digits.s[i] - '0');
        }
        if (v <= MAX_SAFE_INTEGER) {
            *value = PyLong_FromUnsignedLongLong(v);
            return (*value == NULL || put(text, digits.s, digits.n) < 0) ? ERROR : OK;
        }
    }
    *value = ascii_str(digits.s, digits.n);
    if (*value == NULL || put_char(text, '"') < 0 || put(text, digits.s, digits.n) < 0 || put_char(text, '"') < 0) {
        return ERROR;
    }
    return OK;
}

/* An object one level down in attributes: a sentinel (its decoded value) or the empty object. */
static int sentinel(Cur *c, Buf *text, PyObject **value)
{
    c->p++; /* '{' */
    if (eat(c, '}')) {
        *value = PyDict_New();
        return (*value == NULL || put(text, "{}", 2) < 0) ? ERROR : OK;
    }
    Span key, str;
    if (plain_string(c, &key) != OK || !eat(c, ':')) {
        return DECLINE;
    }
    if (SPAN_IS(key, "__bigint") || SPAN_IS(key, "__buffer")) {
        int bigint = SPAN_IS(key, "__bigint");
        if (plain_string(c, &str) != OK || !eat(c, '}')) {
            return DECLINE;
        }
        if (bigint) {
            return bigint_value(str, text, value);
        }
        Py_ssize_t at, len;
        int r = base64_hex(str, text, &at, &len);
        if (r != OK) {
            return r;
        }
        *value = ascii_str(text->data + at, len);
        return *value == NULL ? ERROR : OK;
    }
    /* {"type": "Buffer", "data": [...]}, in either order */
    int type_seen = 0, data_seen = 0;
    Py_ssize_t at = 0, len = 0;
    for (;;) {
        if (SPAN_IS(key, "type") && !type_seen) {
            if (plain_string(c, &str) != OK || !SPAN_IS(str, "Buffer")) {
                return DECLINE;
            }
            type_seen = 1;
        }
        else if (SPAN_IS(key, "data") && !data_seen) {
            int r = node_data_hex(c, text, &at, &len); /* the type writes nothing: only the hex goes in */
            if (r != OK) {
                return r;
            }
            data_seen = 1;
        }
        else {
            return DECLINE;
        }
        if (eat(c, '}')) {
            break;
        }
        if (!eat(c, ',') || plain_string(c, &key) != OK || !eat(c, ':')) {
            return DECLINE;
        }
    }
    if (!type_seen || !data_seen) {
        return DECLINE;
    }
    *value = ascii_str(text->data + at, len);
    return *value == NULL ? ERROR : OK;
}

#define MAX_ATTRIBUTES 128 /* more IO elements than this: the Python ways */

/* Attribute names repeat from entry to entry ("239", "240", ...): one str each, kept with its
 * hash, instead of a new str (and a new hash) per entry. A direct-mapped table; only the GIL's
 * holder touches it. */
#define KEY_CACHE_SIZE 1024
#define KEY_CACHE_MAX_LEN 16
static PyObject *key_cache[KEY_CACHE_SIZE];

static PyObject *key_str(Span key)
{
    if (key.n > KEY_CACHE_MAX_LEN) {
        return ascii_str(key.s, key.n);
    }
    uint32_t h = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < key.n; i++) {
        h = (h ^ (unsigned char)key.s[i]) * 16777619u;
    }
    PyObject **slot = &key_cache[h & (KEY_CACHE_SIZE - 1)];
    PyObject *cached = *slot;
    if (cached != NULL && PyUnicode_GET_LENGTH(cached) == key.n &&
        memcmp(PyUnicode_1BYTE_DATA(cached), key.s, (size_t)key.n) == 0) {
        Py_INCREF(cached);
        return cached;
    }
    PyObject *str = ascii_str(key.s, key.n);
    if (str != NULL) {
        Py_INCREF(str);
        Py_XSETREF(*slot, str);
    }
    return str;
}

/* One value of attributes: a new reference, and its orjson text into ``text``. */
static int attribute_value(Cur *c, Buf *text, PyObject **value)
{
    int ch = peek(c);
    if (ch == '"') {
        Span str;
        if (plain_string(c, &str) != OK) {
            return DECLINE;
        }
        *value = ascii_str(str.s, str.n);
        if (*value == NULL || put_char(text, '"') < 0 || put(text, str.s, str.n) < 0 || put_char(text, '"') < 0) {
            return ERROR;
        }
        return OK;
    }
    if (ch == '{') {
        return sentinel(c, text, value);
    }
    if (ch == 't' || ch == 'f' || ch == 'n') {
        const char *word = ch == 't' ? "true" : ch == 'f' ? "false" : "null";
        size_t n = ch == 'f' ? 5 : 4;
        if (literal(c, word, n) != OK) {
            return DECLINE;
        }
        *value = ch == 't' ? Py_True : ch == 'f' ? Py_False : Py_None;
        Py_INCREF(*value);
        return put(text, word, (Py_ssize_t)n) < 0 ? ERROR : OK;
    }
    int64_t number;
    Span literal_text;
    int r = int_literal(c, &number, &literal_text); /* a float or an array declines */
    if (r != OK) {
        return r;
    }
    *value = PyLong_FromLongLong(number);
    return (*value == NULL || put(text, literal_text.s, literal_text.n) < 0) ? ERROR : OK;
}

/* The attributes object (the cursor on its '{'): a new dict, and its orjson text into ``text``. */
static int attributes(Cur *c, Buf *text, PyObject **out)
{
    Span keys[MAX_ATTRIBUTES];
    PyObject *values[MAX_ATTRIBUTES];
    Py_ssize_t n = 0;
    int r = OK;
    PyObject *dict = NULL;
    c->p++; /* '{' */
    text->len = 0;
    if (put_char(text, '{') < 0) {
        return ERROR;
    }
    if (!eat(c, '}')) {
        for (;;) {
            Span key;
            if (n == MAX_ATTRIBUTES || plain_string(c, &key) != OK || !eat(c, ':')) {
                r = DECLINE;
                goto done;
            }
            if (key.n >= 2 && key.s[0] == '_' && key.s[1] == '_') {
                r = DECLINE; /* the object itself could be a sentinel (the typed way declines it) */
                goto done;
            }
            if ((n && put_char(text, ',') < 0) || put_char(text, '"') < 0 || put(text, key.s, key.n) < 0 ||
                put(text, "\":", 2) < 0) {
                r = ERROR;
                goto done;
            }
            values[n] = NULL;
            r = attribute_value(c, text, &values[n]);
            if (r != OK) {
                Py_XDECREF(values[n]); /* a value made before its text failed */
                goto done;
            }
            keys[n++] = key;
            if (eat(c, '}')) {
                break;
            }
            if (!eat(c, ',')) {
                r = DECLINE;
                goto done;
            }
        }
    }
    if (put_char(text, '}') < 0 || (dict = PyDict_New()) == NULL) {
        r = ERROR;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = key_str(keys[i]);
        if (name == NULL || PyDict_SetItem(dict, name, values[i]) < 0) {
            Py_XDECREF(name);
            r = ERROR;
            goto done;
        }
        Py_DECREF(name);
    }
    if (PyDict_GET_SIZE(dict) != n) {
        r = DECLINE; /* a key twice */
    }
    else if (n == 2 && PyDict_GetItemString(dict, "type") && PyDict_GetItemString(dict, "data")) {
        r = DECLINE; /* shaped like a Node Buffer: the exact way judges the object itself a sentinel */
    }
done:
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(values[i]);
    }
    if (r != OK) {
        Py_XDECREF(dict);
        return r == ERROR || PyErr_Occurred() ? ERROR : DECLINE;
    }
    *out = dict;
    return OK;
}

/* -- one entry ----------------------------------------------------------------------- */

/* Fields of the payload, in CONTRACT 1's order: their bit in ``seen``. */
enum {
    F_DEVICE_ID, F_TIMESTAMP, F_LATITUDE, F_LONGITUDE, F_ALTITUDE, F_ANGLE, F_SPEED,
    F_SATELLITES, F_PRIORITY, F_EVENT_ID, F_ATTRIBUTES, N_FIELDS
};
static const char *const FIELD_NAMES[N_FIELDS] = {
    "device_id", "timestamp", "latitude", "longitude", "altitude", "angle", "speed",
    "satellites", "priority", "event_id", "attributes",
};

typedef struct {
    Span text;  /* the literal, which is also its COPY text */
    int dot0;   /* a float written without a fraction: repr adds ".0" */
    int null;   /* JSON null: absent */
    double real;
    int64_t integer;
} Value;

typedef struct {
    Py_ssize_t max_payload;
    int64_t latest_ms;
    PyTypeObject *position_type;
    Buf attributes; /* the attributes' orjson text */
    Buf line;       /* the row's COPY text */
} Ctx;

static int field_index(Span key)
{
    int i;
    switch (key.s[0] * (key.n > 0)) {
    case 'd': i = F_DEVICE_ID; break;
    case 't': i = F_TIMESTAMP; break;
    case 'l': i = key.n > 2 && key.s[2] == 't' ? F_LATITUDE : F_LONGITUDE; break;
    case 'a': i = key.n > 1 && key.s[1] == 'l' ? F_ALTITUDE : key.n > 1 && key.s[1] == 'n' ? F_ANGLE : F_ATTRIBUTES; break;
    case 's': i = key.n > 1 && key.s[1] == 'p' ? F_SPEED : F_SATELLITES; break;
    case 'p': i = F_PRIORITY; break;
    case 'e': i = F_EVENT_ID; break;
    default: return -1;
    }
    /* the first letters chose the only candidate: the whole name must match */
    return (size_t)key.n == strlen(FIELD_NAMES[i]) && memcmp(key.s, FIELD_NAMES[i], (size_t)key.n) == 0 ? i : -1;
}

static int device_id(Cur *c, Span *out)
{
    if (plain_string(c, out) != OK || out->n < 1 || out->n > MAX_DEVICE_ID) {
        return DECLINE;
    }
    for (Py_ssize_t i = 0; i < out->n; i++) {
        unsigned char ch = (unsigned char)out->s[i];
        if (!(is_digit(ch) || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))) {
            return DECLINE; /* the typed way takes only alphanumeric ids too; the others go the exact way */
        }
    }
    return OK;
}

static int timestamp(Cur *c, const Ctx *ctx, int64_t *ms)
{
    if (peek(c) == '"') {
        Span text;
        if (plain_string(c, &text) != OK || iso_ms(text, ms) != OK) {
            return DECLINE;
        }
    }
    else {
        Span text;
        if (int_literal(c, ms, &text) != OK) {
            return DECLINE;
        }
    }
    if (*ms < MIN_EPOCH_MS || *ms > ctx->latest_ms || *ms > MAX_EPOCH_MS) {
        return DECLINE; /* outside the window: the exact way names it */
    }
    return OK;
}

/* A float field within [low, high]. */
static int real(Cur *c, Value *v, double low, double high)
{
    if (float_literal(c, &v->real, &v->text, &v->dot0) != OK || !(v->real >= low && v->real <= high)) {
        return DECLINE;
    }
    return OK;
}

/* An optional float field (null: absent, as when it is left out), within [low, high]. */
static int optional_real(Cur *c, Value *v, double low, double high)
{
    v->null = peek(c) == 'n';
    return v->null ? literal(c, "null", 4) : real(c, v, low, high);
}

/* An optional integer field (null: absent, as when it is left out), within [low, high]. */
static int optional_int(Cur *c, Value *v, int64_t low, int64_t high)
{
    v->null = peek(c) == 'n';
    if (v->null) {
        return literal(c, "null", 4);
    }
    if (int_literal(c, &v->integer, &v->text) != OK || v->integer < low || v->integer > high) {
        return DECLINE;
    }
    return OK;
}

static inline PyObject *float_or_none(const Value *v)
{
    if (v->null) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(v->real);
}

static inline PyObject *int_or_none(const Value *v)
{
    if (v->null) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(v->integer);
}

static int put_real(Buf *b, const Value *v)
{
    if (v->null) {
        return put(b, "\\N", 2);
    }
    if (put(b, v->text.s, v->text.n) < 0) {
        return -1;
    }
    return v->dot0 ? put(b, ".0", 2) : 0;
}

static int put_int(Buf *b, const Value *v)
{
    return v->null ? put(b, "\\N", 2) : put(b, v->text.s, v->text.n);
}

static inline char *two_digits(char *s, int v)
{
    s[0] = (char)('0' + v / 10);
    s[1] = (char)('0' + v % 10);
    return s + 2;
}

/* isoformat() of the UTC datetime: YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00 (ffffff: the milliseconds and 000). */
static int put_timestamp(Buf *b, int year, int month, int day, int64_t in_day_ms)
{
    char s[32], *q = s;
    int milli = (int)(in_day_ms % 1000);
    q = two_digits(q, year / 100);
    q = two_digits(q, year % 100);
    *q++ = '-';
    q = two_digits(q, month);
    *q++ = '-';
    q = two_digits(q, day);
    *q++ = 'T';
    q = two_digits(q, (int)(in_day_ms / 3600000));
    *q++ = ':';
    q = two_digits(q, (int)(in_day_ms / 60000 % 60));
    *q++ = ':';
    q = two_digits(q, (int)(in_day_ms / 1000 % 60));
    if (milli) {
        *q++ = '.';
        *q++ = (char)('0' + milli / 100);
        q = two_digits(q, milli % 100);
        memcpy(q, "000", 3);
        q += 3;
    }
    memcpy(q, "+00:00", 6);
    q += 6;
    return put(b, s, q - s);
}

/* One entry: OK with a new Position and its row, DECLINE, or ERROR (a Python exception set). */
static int decode_one(PyObject *fields, Ctx *ctx, PyObject **position, PyObject **row)
{
    if (!PyDict_CheckExact(fields) || PyDict_GET_SIZE(fields) > MAX_FIELDS) {
        return DECLINE;
    }
    PyObject *raw = PyDict_GetItemWithError(fields, payload_key); /* borrowed */
    if (raw == NULL) {
        return PyErr_Occurred() ? ERROR : DECLINE;
    }
    if (!PyBytes_CheckExact(raw) || PyBytes_GET_SIZE(raw) < 1 || PyBytes_GET_SIZE(raw) > ctx->max_payload) {
        return DECLINE;
    }
    const char *data = PyBytes_AS_STRING(raw);
    Py_ssize_t size = PyBytes_GET_SIZE(raw);
    Cur c = {(const unsigned char *)data, (const unsigned char *)data + size, 0};
    if (!payload_is_plain(c.p, size, &c.spaces)) {
        return DECLINE;
    }
    Span device = {NULL, 0};
    int64_t ts_ms = 0;
    Value values[N_FIELDS];
    memset(values, 0, sizeof values);
    for (int i = F_ALTITUDE; i <= F_EVENT_ID; i++) {
        values[i].null = 1; /* an optional field left out */
    }
    PyObject *attrs = NULL;
    unsigned seen = 0;
    int r = DECLINE;

    if (!eat(&c, '{')) {
        return DECLINE;
    }
    if (eat(&c, '}')) {
        return DECLINE; /* no field */
    }
    for (;;) {
        Span key;
        if (plain_string(&c, &key) != OK || !eat(&c, ':')) {
            goto done;
        }
        int field = field_index(key);
        if (field < 0 || (seen & (1u << field))) {
            goto done; /* an unknown key (the typed way declines it), or a key twice */
        }
        seen |= 1u << field;
        Value *v = &values[field];
        switch (field) {
        case F_DEVICE_ID:
            r = device_id(&c, &device);
            break;
        case F_TIMESTAMP:
            r = timestamp(&c, ctx, &ts_ms);
            break;
        case F_LATITUDE:
            r = real(&c, v, -90.0, 90.0);
            break;
        case F_LONGITUDE:
            r = real(&c, v, -180.0, 180.0);
            break;
        case F_ALTITUDE: /* a real column: finite, and no magnitude below 1e-4 gets here but zero */
            r = optional_real(&c, v, -1e16, 1e16);
            break;
        case F_ANGLE:
            r = optional_real(&c, v, 0.0, 360.0);
            break;
        case F_SPEED:
            r = optional_real(&c, v, 0.0, 1e16);
            break;
        case F_SATELLITES:
            r = optional_int(&c, v, 0, 255);
            break;
        case F_PRIORITY:
            r = optional_int(&c, v, 0, 2);
            break;
        case F_EVENT_ID:
            r = optional_int(&c, v, 0, MAX_EVENT_ID);
            break;
        case F_ATTRIBUTES:
            if (peek(&c) == '{') {
                r = attributes(&c, &ctx->attributes, &attrs);
            }
            else {
                r = literal(&c, "null", 4);
            }
            break;
        }
        if (r != OK) {
            goto done;
        }
        r = DECLINE;
        if (eat(&c, '}')) {
            break;
        }
        if (!eat(&c, ',')) {
            goto done;
        }
    }
    skip_ws(&c);
    if (c.p != c.end) {
        goto done; /* something after the object */
    }
    const unsigned required = (1u << F_DEVICE_ID) | (1u << F_TIMESTAMP) | (1u << F_LATITUDE) | (1u << F_LONGITUDE);
    if ((seen & required) != required) {
        goto done; /* a required field absent: the exact way names it */
    }

    /* The row of COPY text, in the writer's column order. */
    int year, month, day;
    civil_from_days(ts_ms / MS_PER_DAY, &year, &month, &day);
    int64_t in_day = ts_ms % MS_PER_DAY;
    Buf *b = &ctx->line;
    b->len = 0;
    if (put(b, device.s, device.n) < 0 || put_char(b, '\t') < 0 || put_timestamp(b, year, month, day, in_day) < 0) {
        goto error;
    }
    for (int i = F_LATITUDE; i <= F_EVENT_ID; i++) {
        int failed = put_char(b, '\t') < 0 || (i <= F_SPEED ? put_real(b, &values[i]) : put_int(b, &values[i])) < 0;
        if (failed) {
            goto error;
        }
    }
    Py_ssize_t attrs_len = ctx->attributes.len;
    int empty = attrs == NULL || PyDict_GET_SIZE(attrs) == 0;
    if (put_char(b, '\t') < 0 || (empty ? put(b, "{}", 2) : put(b, ctx->attributes.data, attrs_len)) < 0 ||
        put_char(b, '\n') < 0) {
        goto error;
    }

    /* The Position, as the typed way builds it. */
    PyObject *p = ctx->position_type->tp_alloc(ctx->position_type, 11);
    if (p == NULL) {
        goto error;
    }
    PyObject *items[11];
    items[0] = ascii_str(device.s, device.n);
    items[1] = PyDateTimeAPI->DateTime_FromDateAndTime(year, month, day, (int)(in_day / 3600000),
                                                       (int)(in_day / 60000 % 60), (int)(in_day / 1000 % 60),
                                                       (int)(in_day % 1000) * 1000, PyDateTime_TimeZone_UTC,
                                                       PyDateTimeAPI->DateTimeType);
    items[2] = PyFloat_FromDouble(values[F_LATITUDE].real);
    items[3] = PyFloat_FromDouble(values[F_LONGITUDE].real);
    items[4] = float_or_none(&values[F_ALTITUDE]);
    items[5] = float_or_none(&values[F_ANGLE]);
    items[6] = float_or_none(&values[F_SPEED]);
    items[7] = int_or_none(&values[F_SATELLITES]);
    items[8] = int_or_none(&values[F_PRIORITY]);
    items[9] = int_or_none(&values[F_EVENT_ID]);
    items[10] = attrs != NULL ? attrs : Py_None;
    if (attrs == NULL) {
        Py_INCREF(Py_None);
    }
    attrs = NULL; /* owned by items now */
    int missing = 0;
    for (int i = 0; i < 11; i++) {
        missing |= items[i] == NULL;
        PyTuple_SET_ITEM(p, i, items[i]); /* NULL items are left to the tuple's dealloc, which skips them */
    }
    if (missing) {
        Py_DECREF(p);
        goto error;
    }
    *row = PyBytes_FromStringAndSize(b->data, b->len);
    if (*row == NULL) {
        Py_DECREF(p);
        goto error;
    }
    *position = p;
    return OK;
done:
    Py_XDECREF(attrs);
    return PyErr_Occurred() ? ERROR : DECLINE;
error:
    Py_XDECREF(attrs);
    return ERROR;
}

static PyObject *decode_batch(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *entries, *position_type;
    Ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    long long latest_ms;
    if (!PyArg_ParseTuple(args, "OnLO!:decode_batch", &entries, &ctx.max_payload, &latest_ms, &PyType_Type,
                          &position_type)) {
        return NULL;
    }
    ctx.latest_ms = latest_ms;
    ctx.position_type = (PyTypeObject *)position_type;
    if (!PyType_IsSubtype(ctx.position_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "position_type must be a tuple subclass (the Position NamedTuple)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(entries, "entries must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *positions = PyList_New(n), *rows = PyList_New(n);
    if (positions == NULL || rows == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *position = NULL, *row = NULL;
        int r = decode_one(items[i], &ctx, &position, &row);
        if (r == ERROR) {
            goto error;
        }
        if (r == DECLINE) {
            position = Py_None;
            row = Py_None;
            Py_INCREF(Py_None);
            Py_INCREF(Py_None);
        }
        PyList_SET_ITEM(positions, i, position);
        PyList_SET_ITEM(rows, i, row);
    }
    Py_DECREF(seq);
    PyMem_Free(ctx.attributes.data);
    PyMem_Free(ctx.line.data);
    return Py_BuildValue("(NN)", positions, rows);
error:
    Py_DECREF(seq);
    Py_XDECREF(positions);
    Py_XDECREF(rows);
    PyMem_Free(ctx.attributes.data);
    PyMem_Free(ctx.line.data);
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_batch", decode_batch, METH_VARARGS,
     "decode_batch(entries, max_payload_bytes, latest_ms, position_type) -> (positions, rows)\n\n"
     "The usual entries decoded: each a Position and its row of COPY text, or None and None\n"
     "where the compiled way declines (the Python ways decide)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "The decoder's compiled way (processor.core.decode).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) {
        return NULL;
    }
    payload_key = PyBytes_FromString("payload");
    if (payload_key == NULL) {
        return NULL;
    }
    return PyModule_Create(&module);
}
