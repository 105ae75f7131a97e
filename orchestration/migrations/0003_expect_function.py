"""A tiny PostgreSQL function that aborts the transaction when an expectation fails.

The engine's completion runs its checks (the step's fencing token still holds, the run row is
unchanged since it was read) inside the same pipelined round trip as its writes and COMMIT;
a failed check must abort everything with a recognisable SQLSTATE. Nothing on SQLite.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION signalbox_expect(ok boolean, code text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = 'signalbox expectation failed: ' || code;
    END IF;
    RETURN true;
END
$$;
"""
DROP = "DROP FUNCTION IF EXISTS signalbox_expect(boolean, text);"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0002_run_version")]
    operations = [migrations.RunPython(create, drop)]
