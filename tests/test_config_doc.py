"""docs/operations.md's configuration table is generated from the config models: it must match."""

from kvstore import config_doc
from kvstore.config import Config


def test_operations_doc_config_table_is_current():
    text = config_doc.DOC.read_text()
    assert config_doc.replace_in(text) == text, "run `python -m kvstore.config_doc --write`"


def test_every_setting_is_documented():
    rendered = config_doc.render()
    for section, info in Config.model_fields.items():
        for name in info.annotation.model_fields:
            row = next(r for r in rendered.splitlines() if r.startswith(f"| `{section}.{name}` |"))
            assert not row.endswith("|  |"), f"{section}.{name} has no #: comment in kvstore/config.py"
