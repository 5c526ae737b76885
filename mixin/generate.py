"""Writes the generated monitoring files from mixin/config.yml, or checks they are current."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixin.config import ConfigError, MixinConfig, load_config
from mixin.dashboard import render_dashboard
from mixin.rules import render_prometheus_rule, render_rules

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "mixin" / "config.yml"
RULES = Path("deploy/prometheus/rules.yml")
PROMETHEUS_RULE = Path("deploy/kubernetes/base/prometheusrule.yaml")
DASHBOARD = Path("grafana/dashboards/zego-cloudrecord.json")


def outputs(config: MixinConfig, config_name: str = "mixin/config.yml") -> dict[Path, str]:
    """Each generated file (relative to the output directory) and its content."""
    rules = render_rules(config, config_name)
    return {
        RULES: rules,
        PROMETHEUS_RULE: render_prometheus_rule(rules, config_name),
        DASHBOARD: render_dashboard(config),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixin", description=__doc__)
    parser.add_argument("--config", type=Path, default=CONFIG_FILE,
                        help="the settings (default: mixin/config.yml)")
    parser.add_argument("--output-dir", type=Path, default=ROOT,
                        help="where to write the files (default: the repository)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file differs from a fresh generation")
    args = parser.parse_args(argv)
    config_path = args.config.resolve()
    name = (str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT)
            else str(args.config))
    try:
        files = outputs(load_config(config_path), name)
    except ConfigError as error:
        print(f"{args.config}: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # the rules template, or a file
        print(error, file=sys.stderr)
        return 1
    stale = []
    for relative, text in files.items():
        path = args.output_dir / relative
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(relative))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"stale, run python -m mixin: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0
