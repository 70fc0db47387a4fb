"""Loading a bundle from disk: which files count, the version hash, and failures as issues."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from sidecar.errors import PolicyLoadError
from sidecar.policy.issues import Code, PolicyIssue, Severity
from sidecar.policy.loader import (
    MAX_FILE_BYTES,
    bundle_fingerprint,
    lint_policy,
    load_policy,
    policy_files,
)
from sidecar.policy.schemas import unknown_keywords

EXAMPLES = Path(__file__).resolve().parents[3] / "policies"
TESTDATA = Path(__file__).parent / "testdata"

APPROVERS = "approver_roles:\n  ops:\n    groups: [ops]\n"
TOOL = """tools:
  lookup:
    writes: true
    arguments: {type: object}
    tiers:
      - name: default
        when: args.x ==
        action: allow
"""


def copy_examples(destination: Path) -> Path:
    """A private copy of the example bundle (policy files only)."""
    shutil.copytree(EXAMPLES, destination, ignore=shutil.ignore_patterns("*.md"))
    return destination


def test_version_is_stable_for_identical_content(tmp_path: Path) -> None:
    """Two copies of the same files, in different places, have the same version."""
    first = load_policy(copy_examples(tmp_path / "a"))
    second = load_policy(copy_examples(tmp_path / "b"))
    assert first.version == second.version == load_policy(EXAMPLES).version


def test_version_changes_when_one_byte_changes(tmp_path: Path) -> None:
    """Changing a single byte, even in a comment, gives a new version."""
    bundle = copy_examples(tmp_path / "bundle")
    before = load_policy(bundle).version
    path = bundle / "billing.yaml"
    data = bytearray(path.read_bytes())
    data[data.index(b"#") + 2] ^= 0x20  # flip the case of a comment's first letter
    path.write_bytes(bytes(data))
    assert load_policy(bundle).version != before


def test_version_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    """The version covers file names too: moving a file is a change."""
    bundle = copy_examples(tmp_path / "bundle")
    before = load_policy(bundle).version
    (bundle / "support.yaml").rename(bundle / "support-team.yaml")
    assert load_policy(bundle).version != before


def test_test_files_are_neither_loaded_nor_hashed(tmp_path: Path) -> None:
    """*_test.yaml and *_test.yml files are policy tests: not policy, not part of the version."""
    bundle = copy_examples(tmp_path / "bundle")
    before = load_policy(bundle)
    (bundle / "billing_test.yaml").write_text("not: [valid policy\n")
    (bundle / "nested").mkdir()
    (bundle / "nested" / "refunds_test.yml").write_text("tools: 3\n")
    after = load_policy(bundle)
    assert after.version == before.version
    assert after.sources == before.sources
    assert lint_policy(bundle) == ()


def test_files_are_found_recursively_sorted_and_hidden_ones_skipped(tmp_path: Path) -> None:
    """Sub-directories count, paths are POSIX and sorted; dot files and dot dirs do not count."""
    for name in ("b.yaml", "a/z.yml", "a/b/c.YAML", ".hidden.yaml", ".git/x.yaml", "notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert policy_files(tmp_path) == ("a/b/c.YAML", "a/z.yml", "b.yaml")


def test_issue_paths_are_relative_to_the_bundle(tmp_path: Path) -> None:
    """A problem in a nested file names it relative to the bundle directory."""
    (tmp_path / "team" / "billing").mkdir(parents=True)
    (tmp_path / "team" / "billing" / "tools.yaml").write_text(TOOL)
    [issue] = [i for i in lint_policy(tmp_path) if i.code == Code.CEL_SYNTAX]
    assert (issue.file, issue.line, issue.col) == ("team/billing/tools.yaml", 7, 24)


def test_empty_files_contribute_nothing(tmp_path: Path) -> None:
    """An empty (or comment-only) file is valid and adds no definitions."""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\n")
    (tmp_path / "approvers.yaml").write_text(APPROVERS)
    policy = load_policy(tmp_path)
    assert policy.sources == ("approvers.yaml", "comments.yaml", "empty.yaml")
    assert set(policy.approver_roles) == {"ops"}
    assert not policy.tools


def test_warnings_do_not_block_loading() -> None:
    """A bundle with only warnings loads; lint still reports the warning."""
    bundle = TESTDATA / "write_tool_without_pins"
    [warning] = lint_policy(bundle)
    assert warning.severity is Severity.WARNING
    assert load_policy(bundle).tools["createTicket"].writes


def test_load_error_carries_only_errors_sorted(tmp_path: Path) -> None:
    """PolicyLoadError holds every error (no warnings), sorted, and names the first."""
    (tmp_path / "b.yaml").write_text(TOOL)
    (tmp_path / "a.yaml").write_text("roles:\n  r:\n    tools: [nope]\n")
    with pytest.raises(PolicyLoadError) as raised:
        load_policy(tmp_path)
    issues = raised.value.issues
    assert all(isinstance(i, PolicyIssue) and i.severity is Severity.ERROR for i in issues)
    assert [(i.file, i.code) for i in issues if isinstance(i, PolicyIssue)] == [
        ("a.yaml", Code.MISSING_FIELD),
        ("a.yaml", Code.UNDEFINED_TOOL),
        ("b.yaml", Code.CEL_SYNTAX),
    ]
    assert str(raised.value).startswith("a.yaml:2:3: error MISSING_FIELD:")
    assert str(raised.value).endswith("(and 2 more)")
    assert Code.WRITE_TOOL_WITHOUT_PINS in {i.code for i in lint_policy(tmp_path)}


def test_unreadable_file_is_an_issue(tmp_path: Path) -> None:
    """A file that cannot be opened (here a dangling symlink) is reported, not raised."""
    (tmp_path / "ok.yaml").write_text(APPROVERS)
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing")
    [issue] = lint_policy(tmp_path)
    assert (issue.file, issue.line, issue.code) == ("gone.yaml", 0, Code.READ_ERROR)
    assert str(issue).startswith("gone.yaml: error READ_ERROR: cannot read the file")


def test_a_named_pipe_is_an_issue_not_a_hang(tmp_path: Path) -> None:
    """Opening a FIFO named like a policy file waits for a writer forever: the load (and a
    server's reload lock and watcher with it) hung. It is refused as READ_ERROR, and so is a
    device (a link to /dev/zero read as 1 MiB of NULs)."""
    (tmp_path / "ok.yaml").write_text(APPROVERS)
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    found: list[tuple[PolicyIssue, ...]] = []
    linting = threading.Thread(target=lambda: found.append(lint_policy(tmp_path)), daemon=True)
    linting.start()
    linting.join(timeout=10)
    if linting.is_alive():  # a writer releases the stuck open, so the thread can end
        os.close(os.open(tmp_path / "pipe.yaml", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading the bundle hung on the named pipe")
    [issues] = found
    assert [(i.file, i.code) for i in issues] == [
        ("pipe.yaml", Code.READ_ERROR),
        ("zero.yaml", Code.READ_ERROR),
    ]
    assert "not a regular file" in issues[0].message
    assert bundle_fingerprint(tmp_path)  # the watcher's hash does not hang either


def test_oversized_file_is_an_issue(tmp_path: Path) -> None:
    """A file over the size limit is refused without being parsed."""
    (tmp_path / "big.yaml").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    assert [(i.file, i.code) for i in lint_policy(tmp_path)] == [("big.yaml", Code.FILE_TOO_LARGE)]


def test_missing_directory_is_an_issue(tmp_path: Path) -> None:
    """Pointing the loader at nothing yields an issue for the bundle itself."""
    with pytest.raises(PolicyLoadError) as raised:
        load_policy(tmp_path / "nowhere")
    [issue] = raised.value.issues
    assert isinstance(issue, PolicyIssue)
    assert (issue.file, issue.code) == (".", Code.READ_ERROR)


def test_issues_are_collected_across_all_stages(tmp_path: Path) -> None:
    """One run reports problems from YAML, format, references and CEL together."""
    (tmp_path / "a.yaml").write_text("label: [x\n")
    (tmp_path / "b.yaml").write_text("agents:\n  x@y:\n    roles: [ghost]\n    extra: 1\n")
    (tmp_path / "c.yaml").write_text(TOOL)
    codes = {issue.code for issue in lint_policy(tmp_path)}
    assert {
        Code.YAML_SYNTAX,
        Code.UNKNOWN_FIELD,
        Code.UNDEFINED_ROLE,
        Code.CEL_SYNTAX,
        Code.WRITE_TOOL_WITHOUT_PINS,
    } <= codes


def test_the_fingerprint_is_the_version_a_load_would_give(tmp_path: Path) -> None:
    """The watcher's cheap hash equals the loaded version, and moves with any edit."""
    bundle = copy_examples(tmp_path / "bundle")
    assert bundle_fingerprint(bundle) == load_policy(bundle).version
    before = bundle_fingerprint(bundle)
    (bundle / "billing_test.yaml").write_text("tests do not count\n")
    assert bundle_fingerprint(bundle) == before
    with (bundle / "billing.yaml").open("a") as stream:
        stream.write("# a comment is a change\n")
    assert bundle_fingerprint(bundle) != before
    assert bundle_fingerprint(bundle) == load_policy(bundle).version


def _catch_all_finance_tier(bundle: Path, approver_condition: str) -> None:
    """Make the refund's last tier (no `when`) an approval tier with ``approver_condition``."""
    path = bundle / "billing.yaml"
    text = path.read_text()
    old = (
        "      - name: over-limit\n        action: deny\n"
        "        message: Refunds above 5000 are never made by an agent.\n"
    )
    assert old in text
    new = (
        "      - name: over-limit\n        action: require_approval\n        approvals: 1\n"
        "        approver_roles: [finance-approver]\n"
        f"        approver_condition: {approver_condition}\n"
    )
    path.write_text(text.replace(old, new))


def test_a_catch_all_tier_keeps_its_approver_condition(tmp_path: Path) -> None:
    """A tier without `when` is compiled with its approver condition: it used to be skipped,
    and the tier then let every eligible approver through (separation of duties lost)."""
    bundle = copy_examples(tmp_path / "bundle")
    _catch_all_finance_tier(bundle, "'\"no_agents\" in approver.claims'")
    tier = load_policy(bundle).tier("requestRefund", "over-limit")
    assert tier is not None
    assert tier.when is None
    assert tier.approver_condition is not None
    assert tier.approver_condition.source == '"no_agents" in approver.claims'


def test_a_catch_all_tiers_broken_approver_condition_is_an_error(tmp_path: Path) -> None:
    """...and a CEL error in it is reported at its line, as for any other tier."""
    bundle = copy_examples(tmp_path / "bundle")
    _catch_all_finance_tier(bundle, "'this is (not CEL'")
    line = next(
        number
        for number, text in enumerate((bundle / "billing.yaml").read_text().splitlines(), 1)
        if "this is (not CEL" in text
    )
    with pytest.raises(PolicyLoadError) as raised:
        load_policy(bundle)
    [issue] = raised.value.issues
    assert isinstance(issue, PolicyIssue)
    assert (issue.file, issue.line, issue.code) == ("billing.yaml", line, Code.CEL_SYNTAX)
    assert "approver condition of tier 'over-limit'" in issue.message


def test_a_misspelt_schema_keyword_is_an_error_at_its_line(tmp_path: Path) -> None:
    """JSON Schema ignores keywords it does not define, so a typo would silently drop the
    constraint (a negative refund auto-approved): lint names each, in subschemas too, with
    a "did you mean"; annotations, `x-` extensions and property names are left alone."""
    bundle = copy_examples(tmp_path / "bundle")
    path = bundle / "billing.yaml"
    text = path.read_text()
    for right, wrong in (
        ("exclusiveMinimum: 0", "exclusiveMinimun: 0"),
        ("maxLength: 500", "maxLenght: 500"),
    ):
        assert text.count(right) == 1
        text = text.replace(right, wrong)
    text = text.replace(
        "          minLength: 1\n",
        "          minLength: 1\n          x-pii: true\n          description: why\n",
        1,
    )
    path.write_text(text)
    lines = text.splitlines()
    issues = [i for i in lint_policy(bundle) if i.code == Code.UNKNOWN_SCHEMA_KEYWORD]
    assert [(i.file, lines[i.line - 1].strip(), i.hint) for i in issues] == [
        ("billing.yaml", "exclusiveMinimun: 0", "did you mean 'exclusiveMinimum'?"),
        ("billing.yaml", "maxLenght: 500", "did you mean 'maxLength'?"),
    ]
    assert all(i.severity is Severity.ERROR for i in issues)
    assert "at /properties/amount" in issues[0].message
    with pytest.raises(PolicyLoadError):
        load_policy(bundle)


def test_unknown_keywords_are_found_in_every_kind_of_subschema() -> None:
    """Subschemas under applicators, lists and maps are walked; data values are not."""
    schema = {
        "type": "object",
        "properties": {"requried": {"type": "string", "minLenght": 1}},
        "$defs": {"d": {"typo": 1}},
        "definitions": {"old": {"type": "string", "minimun": 1}},
        "allOf": [{"not": {"maximun": 3}}],
        "items": {"prefixItems": [True, {"bad": 1}]},
        "enum": [{"notAKeyword": 1}],
        "default": {"alsoData": 1},
        "dependentRequired": {"a": ["b"]},
        "x-owner": "billing",
    }
    assert list(unknown_keywords(schema)) == [
        ("properties", "requried", "minLenght"),
        ("$defs", "d", "typo"),
        ("definitions", "old", "minimun"),
        ("allOf", 0, "not", "maximun"),
        ("items", "prefixItems", 1, "bad"),
    ]


@pytest.mark.parametrize(
    ("file", "old", "new", "changes"),
    [
        ("common.yaml", "groups: [billing-supervisors]", "groups: [billing-leads]", True),
        ("billing.yaml", "approvals: 1\n", "approvals: 2\n", True),
        ("billing.yaml", "ttl: 24h\n      - name: finance", "ttl: 24h\n        vetoes: 2\n"
         "      - name: finance", True),
        ("billing.yaml", "[billing-supervisor]\n        ttl", "[billing-supervisor, "
         "finance-approver]\n        ttl", True),
        ("billing.yaml", "ttl: 24h\n      - name: finance", "ttl: 24h\n        approver_condition:"
         " 'true'\n      - name: finance", True),
        # Not who may approve: the request's lifetime, another tier, another role's groups.
        ("billing.yaml", "ttl: 24h\n      - name: finance", "ttl: 12h\n      - name: finance",
         False),
        ("billing.yaml", "approvals: 2\n", "approvals: 3\n", False),
        ("common.yaml", "groups: [finance-approvers]", "groups: [finance]", False),
    ],
)  # fmt: skip
def test_approval_rules_change_with_who_may_approve(
    tmp_path: Path, file: str, old: str, new: str, changes: bool
) -> None:
    """The supervisor tier's approval rules digest follows its approvers, their groups, its
    counts and its approver condition, and nothing else."""
    before = load_policy(EXAMPLES).approval_rules("requestRefund", "supervisor")
    bundle = copy_examples(tmp_path / "bundle")
    text = (bundle / file).read_text()
    assert text.count(old) == 1, old
    (bundle / file).write_text(text.replace(old, new))
    after = load_policy(bundle).approval_rules("requestRefund", "supervisor")
    assert before is not None
    assert after is not None
    assert (after != before) is changes


def test_approval_rules_are_none_for_a_tier_without_approvals() -> None:
    policy = load_policy(EXAMPLES)
    assert policy.approval_rules("requestRefund", "auto") is None
    assert policy.approval_rules("requestRefund", "no-such-tier") is None
    assert policy.approval_rules("noSuchTool", "supervisor") is None
