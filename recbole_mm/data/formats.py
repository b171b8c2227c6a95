"""The header lines of our atomic files (RecBole's ``name:type`` columns, tab-separated): the one
definition that the writers (``pipeline/preprocess.py``, ``pipeline/merge.py``,
``pipeline/images.py``, ``data/demo.py``) and the readers (``data/readers.py``) share."""

from __future__ import annotations

INTER_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")  # <name>.{train,valid,test}.inter
TEXT_HEADER = ("item_id:token", "text:token_seq")  # <name>.text
URL_HEADER = ("item_id:token", "url:token")  # <name>.imageurl
ATTR_HEADER = ("item_id:token", "title:token_seq", "brand:token_seq", "category:token_seq")  # <name>.attr


def header_line(columns) -> str:
    """The header line of a file with these columns, without its newline."""
    return "\t".join(columns)
