"""The module's path fields: what each ``ctkPathLineEdit`` picks, how its text becomes a parameter, its history.

Read from CTK's ``ctkPathLineEdit.cpp``: ``currentPathChanged`` is emitted only for text the line edit's validator
accepts, and the validator is built from the name filters' ``*.ext`` patterns (``.+`` without any), so an empty
field is never "accepted": clearing a field would keep the old parameter. The widget therefore follows the text
of the editor's own line edit (``comboBox().editTextChanged``) through :func:`parameter_value`. Also from there:
filters such as ``All files (*)`` are dropped by CTK (no ``*.ext``), ``Dirs | Files`` opens a *file* dialog
(``browse()`` tests ``Files`` first), and history (kept in ``QSettings`` under ``ctkPathLineEdit/<settingKey>``)
grows only when ``addCurrentPathToHistory()`` is called, which the widget does for the fields an action used
(:data:`USED_BY`) when the action starts.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_FILTERS = ("Models (*.pt *.pth)",)
WEIGHTS_FILTERS = ("Weights (*.pt *.pth *.bin *.safetensors)",)
LABELLED_FILE_FILTERS = ("Labels (*.csv *.json)",)


@dataclass(frozen=True)
class PathField:
    """One path editor.

    Attributes:
        widget: the ``ctkPathLineEdit``'s object name in ``USFMAE.ui``.
        parameter: the parameter-node field it sets (``""`` for an editor that is not saved with the scene).
        picks: ``file``, ``dir`` or ``file-or-dir`` (a folder editor with an extra file button, :attr:`file_button`).
        name_filters: file-type filters (only ``*.ext`` patterns: CTK ignores others).
        file_button: the ``QToolButton`` that picks a file into a ``file-or-dir`` field.
    """

    widget: str
    parameter: str
    picks: str
    name_filters: tuple[str, ...] = ()
    file_button: str = ""

    @property
    def ctk_filters(self) -> tuple[str, ...]:
        """Names of ``ctkPathLineEdit.Filter`` flags: ``Files`` opens a file dialog, ``Dirs`` alone a folder one."""
        if self.picks == "file":
            return ("Files", "Readable")
        return ("Dirs",)

    @property
    def setting_key(self) -> str:
        """``settingKey`` of the editor: its history is saved under ``ctkPathLineEdit/USFMAE/<name>``."""
        return f"USFMAE/{self.parameter or self.widget}"


PATH_FIELDS: tuple[PathField, ...] = (
    PathField("classifierPathLineEdit", "classifierPath", "file", MODEL_FILTERS),
    PathField("maePathLineEdit", "maePath", "file", MODEL_FILTERS),
    PathField("importPathLineEdit", "", "file-or-dir", WEIGHTS_FILTERS, "importFileButton"),
    PathField("finetuneDataPathLineEdit", "finetuneData", "file-or-dir", LABELLED_FILE_FILTERS,
              "finetuneDataFileButton"),
    PathField("finetuneInitPathLineEdit", "finetuneInit", "file", MODEL_FILTERS),
    PathField("finetuneOutputPathLineEdit", "finetuneOutput", "dir"),
    PathField("pretrainSourcePathLineEdit", "pretrainSource", "dir"),
    PathField("pretrainInitPathLineEdit", "pretrainInit", "file", MODEL_FILTERS),
    PathField("pretrainOutputPathLineEdit", "pretrainOutput", "dir"),
)

# the fields each action reads: added to their editors' history when the action starts
USED_BY: dict[str, tuple[str, ...]] = {
    "classify": ("classifierPath",),
    "reconstruct": ("maePath",),
    "import": ("importPathLineEdit",),
    "finetune": ("finetuneData", "finetuneInit", "finetuneOutput"),
    "pretrain": ("pretrainSource", "pretrainInit", "pretrainOutput"),
}


def field_for(key: str) -> PathField:
    """The field whose parameter (or widget name) is ``key``."""
    for f in PATH_FIELDS:
        if key in (f.parameter, f.widget):
            return f
    raise KeyError(key)


def parameter_value(text: str | None) -> str:
    """The parameter for an editor's text as typed: surrounding blanks dropped, an empty field is ``""``."""
    return (text or "").strip()


def history_fields(action: str, values: dict[str, str]) -> list[PathField]:
    """Editors whose current path should go into their history when ``action`` starts (non-empty values only)."""
    return [field_for(key) for key in USED_BY.get(action, ()) if parameter_value(values.get(key))]
