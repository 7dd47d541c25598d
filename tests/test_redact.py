"""redact(): the one function that masks credentials wherever a URL or an error text is shown (issue 8)."""

from __future__ import annotations

import io
import logging
import sys

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import processor.core.redact as redact_module
from processor.core import db
from processor.core.config import load_config
from processor.core.consumer import translate
from processor.core.errors import ConfigError, TransientError
from processor.core.logs import JsonFormatter, TextFormatter
from processor.core.redact import redact, register_secrets, url_secrets

PW = "Sup3r-Secr3t-pw"


@pytest.fixture(autouse=True)
def no_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_secrets() is process-wide: each test starts with none and leaves none behind."""
    monkeypatch.setattr(redact_module, "_secrets", ())


# --- URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (f"postgresql://user:{PW}@db.internal:5432/telemetry",
     "postgresql://user:***@db.internal:5432/telemetry"),
    (f"postgres://user:{PW}@db/telemetry?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
     "postgres://user:***@db/telemetry?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem"),
    (f"redis://:{PW}@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
    (f"redis://app:{PW}@redis.internal:6379/0", "redis://app:***@redis.internal:6379/0"),
    (f"rediss://:{PW}@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem",
     "rediss://:***@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem"),
    (f"rediss://app:{PW}@redis.internal:6380/0", "rediss://app:***@redis.internal:6380/0"),
    # redis-py reads a lone user part as the password
    (f"redis://{PW}@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
    # percent-encoded passwords are masked whole
    ("postgresql://user:s3cret%20p%40ss@db/x", "postgresql://user:***@db/x"),
])
def test_password_in_url_is_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_url_inside_a_sentence_is_masked_and_the_rest_kept() -> None:
    text = f"could not connect to postgresql://user:{PW}@db:5432/x (timeout); then redis://:{PW}@r:6379/0 too"
    assert redact(text) == ("could not connect to postgresql://user:***@db:5432/x (timeout); "
                            "then redis://:***@r:6379/0 too")


@pytest.mark.parametrize("text", [
    "postgresql://postgres@localhost:5432/postgres",
    "postgresql://localhost/telemetry?sslmode=require",
    "redis://localhost:6379/0",
    "rediss://redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem",
    "unix:///var/run/redis.sock?db=0",
    "http://127.0.0.1:9464/metrics",
    "consumer started on stream telemetry:t group processor consumer host-1",
    "user@example.com wrote: ok",
])
def test_text_without_a_password_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_unencoded_at_sign_in_a_password_is_masked_whole() -> None:
    url = "redis://:Sup3r@Secr3t@redis.internal:6379/0"
    assert redis.connection.parse_url(url)["password"] == "Sup3r@Secr3t"  # a working configuration
    register_secrets(url)
    assert "Secr3t" not in redact(url)


# --- libpq keyword strings and query parameters --------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (f"host=db port=5432 user=app password={PW} dbname=telemetry",
     "host=db port=5432 user=app password=*** dbname=telemetry"),
    (f"host=db password='{PW} with spaces' dbname=telemetry", "host=db password=*** dbname=telemetry"),
    (f"host=db password = {PW}", "host=db password=***"),
    (f"PASSWORD={PW}", "PASSWORD=***"),
])
def test_libpq_keyword_password_is_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text, expected", [
    (f"postgresql://app@db/telemetry?sslmode=require&password={PW}",
     "postgresql://app@db/telemetry?sslmode=require&password=***"),
    (f"postgresql://app@db/telemetry?sslmode=verify-full&sslpassword={PW}",
     "postgresql://app@db/telemetry?sslmode=verify-full&sslpassword=***"),
    (f"rediss://db:6380/0?ssl_cert_reqs=required&password={PW}",
     "rediss://db:6380/0?ssl_cert_reqs=required&password=***"),
])
def test_password_query_parameter_is_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_password_query_parameter_first_is_masked() -> None:
    shown = redact(f"postgresql://app@db/telemetry?password={PW}&sslmode=require")
    assert PW not in shown
    assert shown.startswith("postgresql://app@db/telemetry?password=***")


def test_query_parameters_after_the_password_are_kept() -> None:
    assert redact(f"postgresql://app@db/telemetry?password={PW}&sslmode=require") == \
        "postgresql://app@db/telemetry?password=***&sslmode=require"


def test_redis_ssl_password_query_option_is_masked() -> None:
    url = f"rediss://:pw1@r:6380/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_password={PW}"
    assert redis.connection.parse_url(url)["ssl_password"] == PW  # redis-py takes it from the URL
    register_secrets(url)
    assert PW not in redact(url)
    assert PW not in redact(f"could not load the key with passphrase {PW}")


# --- registered literal secrets -----------------------------------------------------------

def test_registered_secret_is_masked_out_of_url_form() -> None:
    text = f'FATAL: password "{PW}" rejected for {PW}:{PW}'
    assert redact(text) == text  # not a URL: nothing tells redact() it is a secret...
    register_secrets(f"postgresql://app:{PW}@db/x", "redis://localhost:6379/0")
    assert redact(text) == 'FATAL: password "***" rejected for ***:***'  # ...until it is registered


def test_registered_percent_encoded_secret_is_masked_in_both_forms() -> None:
    register_secrets("redis://:s3cret%20p%40ss@r:6379/0")
    assert redact("auth 's3cret p@ss' failed; in the URL it was s3cret%20p%40ss") == \
        "auth '***' failed; in the URL it was ***"


def test_redis_user_only_url_registers_its_secret() -> None:
    assert url_secrets(f"redis://{PW}@r:6379/0") == (PW,)
    assert url_secrets("postgresql://postgres@db/x", "redis://localhost:6379/0") == ()


def test_registering_twice_keeps_every_secret() -> None:
    register_secrets(f"postgresql://a:{PW}@db/x")
    register_secrets("redis://:other-secret@r:6379/0")
    assert redact(f"{PW} and other-secret") == "*** and ***"


# --- real errors from psycopg2 and redis-py ------------------------------------------------

def _psycopg2_error(dsn: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info:
        psycopg2.connect(dsn, connect_timeout=2)
    return info.value


def test_psycopg2_error_echoing_the_whole_uri_is_masked() -> None:
    exc = _psycopg2_error(f"postgresql://app:{PW}@[::1/telemetry")  # libpq quotes the URI back
    assert PW in str(exc)
    assert PW not in redact(exc)
    assert "postgresql://app:***@[::1/telemetry" in redact(exc)
    assert PW not in db.describe(exc)


def test_psycopg2_error_echoing_the_password_alone_is_masked_once_registered() -> None:
    dsn = f"postgresql://app:{PW}%zz@127.0.0.1:1/telemetry"  # a bad %-escape: libpq quotes the password
    exc = _psycopg2_error(dsn)
    assert f'"{PW}%zz"' in str(exc)
    register_secrets(dsn)  # what cli.main does at start-up with both URLs
    assert redact(exc) == 'invalid dsn: invalid percent-encoded token: "***"\n'
    with pytest.raises(TransientError) as info:
        db.connect(dsn)
    assert PW not in str(info.value)


def test_psycopg2_password_keyword_in_an_error_is_masked() -> None:
    exc = _psycopg2_error(f"host=127.0.0.1 port=1 password={PW} sslmode=nonsense")
    text = f"{exc} (while connecting with host=127.0.0.1 password={PW})"
    assert PW not in redact(text)


def test_psycopg2_refused_connection_keeps_its_useful_text() -> None:
    exc = _psycopg2_error(f"postgresql://app:{PW}@127.0.0.1:1/telemetry")
    assert redact(exc) == str(exc)  # no credentials in it: nothing masked
    assert 'connection to server at "127.0.0.1", port 1 failed' in redact(exc)


def test_redis_errors_through_translate_carry_no_password(throwaway_redis_factory) -> None:
    server = throwaway_redis_factory(password=PW)
    register_secrets(server.url)
    wrong = server.url.replace(PW, "Wr0ng-Secr3t-pw")
    refused = f"redis://:{PW}@127.0.0.1:1/0"
    for url, kind in ((wrong, "AuthenticationError"), (refused, "ConnectionError")):
        client = redis.Redis.from_url(url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(TransientError) as info:
            translate("PING", client.ping)
        client.close()
        assert type(info.value.__cause__).__name__ == kind
        assert "Secr3t" not in str(info.value), str(info.value)
        assert "Secr3t" not in redact(repr(info.value.__cause__))
        assert "Secr3t" not in redact(repr(client))


# --- where redact() is applied: log formatters, config dump, config errors -----------------

def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("processor.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_log_formatters_mask_message_fields_and_traceback(formatter: logging.Formatter) -> None:
    register_secrets(f"redis://:{PW}@r:6379/0")
    record = _record("connect to %s failed", f"postgresql://app:{PW}@db/x", dsn=f"host=db password={PW}",
                     note=f"literal {PW}")
    try:
        raise RuntimeError(f"boom rediss://:{PW}@r:6380/0")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "Secr3t" not in line, line
    assert "postgresql://app:***@db/x" in line


def test_logging_through_the_configured_handler_masks() -> None:
    from processor.core.logs import setup_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("debug", "json", stream=stream)
        logging.getLogger("processor.test").error("dsn %s", f"postgresql://u:{PW}@h/d")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "postgresql://u:***@h/d" in stream.getvalue()
    assert PW not in stream.getvalue()


def test_config_describe_masks_both_urls() -> None:
    config = load_config({"POSTGRES_URL": f"postgresql://app:{PW}@db/x",
                          "REDIS_URL": f"rediss://:{PW}@r:6380/0?ssl_cert_reqs=required"}, dotenv_path=None)
    shown = config.describe()
    assert shown["postgres_url"] == "postgresql://app:***@db/x"
    assert shown["redis_url"] == "rediss://:***@r:6380/0?ssl_cert_reqs=required"
    assert PW not in repr(shown)


@pytest.mark.parametrize("name, value", [
    ("POSTGRES_URL", f"mysql://app:{PW}@db/x"),
    ("POSTGRES_URL", f"postgresql://app:{PW}@[::1/x"),
    ("REDIS_URL", f"http://:{PW}@r:6379/0"),
])
def test_config_error_for_a_bad_url_masks_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({name: value}, dotenv_path=None)
    assert str(info.value).startswith(f"{name} must be ")
    assert PW not in str(info.value)
    assert ":***@" in str(info.value)
