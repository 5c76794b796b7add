"""A benchmark's JSON report: printed, and written to --out when given (shared by the device scripts)."""
import json


def publish(report: dict, out: str | None) -> None:
    print(json.dumps(report, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
