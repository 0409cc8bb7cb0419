"""``python -m otalign.readme``: rewrite the README's generated tables (:func:`otalign.readme.update_readme`)."""

from otalign.readme import update_readme

update_readme()
