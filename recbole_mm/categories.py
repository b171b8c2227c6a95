"""Amazon category names: the short names the papers use -> the Amazon 2023 / 2018 file stems.

Shared by ``recbole-mm prepare`` (which raw files to read or download) and the data layer
(``-d Arts`` on a missing dataset names the command that makes it).  No other imports.
"""

from __future__ import annotations

import os

# paper name -> (Amazon Reviews 2023 category, Amazon 2018 category)
ALIASES = {
    "Arts": ("Arts_Crafts_and_Sewing", "Arts_Crafts_and_Sewing"),
    "Instruments": ("Musical_Instruments", "Musical_Instruments"),
    "Office": ("Office_Products", "Office_Products"),
    "Pantry": ("Grocery_and_Gourmet_Food", "Prime_Pantry"),  # 2023 folded Prime Pantry into Grocery
    "Scientific": ("Industrial_and_Scientific", "Industrial_and_Scientific"),
    "Games": ("Video_Games", "Video_Games"),
    "Beauty": ("All_Beauty", "All_Beauty"),
    "Food": ("Grocery_and_Gourmet_Food", "Grocery_and_Gourmet_Food"),
    "Home": ("Home_and_Kitchen", "Home_and_Kitchen"),
    "Movies": ("Movies_and_TV", "Movies_and_TV"),
    "CDs": ("CDs_and_Vinyl", "CDs_and_Vinyl"),
    "Kindle": ("Kindle_Store", "Kindle_Store"),
    "Sports": ("Sports_and_Outdoors", "Sports_and_Outdoors"),
    "Toys": ("Toys_and_Games", "Toys_and_Games"),
    "Tools": ("Tools_and_Home_Improvement", "Tools_and_Home_Improvement"),
    "Pet": ("Pet_Supplies", "Pet_Supplies"),
    "Clothing": ("Clothing_Shoes_and_Jewelry", "Clothing_Shoes_and_Jewelry"),
    "Cell": ("Cell_Phones_and_Accessories", "Cell_Phones_and_Accessories"),
    "Electronics": ("Electronics", "Electronics"),
    "Automotive": ("Automotive", "Automotive"),
    "Books": ("Books", "Books"),
}
_LOWER = {k.lower(): k for k in ALIASES}


def resolve(name: str) -> tuple[str, str]:
    """``(2023 category, 2018 category)`` of a paper name (case-insensitive); any other name is
    taken as an Amazon category itself."""
    key = _LOWER.get(name.lower())
    return ALIASES[key] if key else (name, name)


def prepare_hint(name: str, data_root: str | None = None) -> str:
    """The one command that makes dataset ``name`` (for a 'dataset folder not found' error)."""
    cat = resolve(name)[0]
    out = "" if not data_root or os.path.normpath(data_root) == os.path.normpath("dataset/downstream") else f" --output {data_root}"
    return f"recbole-mm prepare {name} --download --input raw/{cat}{out}"
