//! Kubernetes resource quantities (`500m`, `2`, `64Mi`, `1G`, `1e3`) as CPU millis and bytes.

fn split(q: &str) -> (&str, &str) {
    let idx = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    q.split_at(idx)
}

fn scaled(q: &str) -> Option<f64> {
    let q = q.trim();
    let (num, suffix) = split(q);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// A CPU quantity in millicores, rounded up.
pub fn cpu_millis(q: &str) -> Option<u64> {
    scaled(q).map(|v| (v * 1000.0).ceil() as u64)
}

/// A memory quantity in bytes, rounded up.
pub fn memory_bytes(q: &str) -> Option<u64> {
    scaled(q).map(|v| v.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse() {
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.1"), Some(100));
        assert_eq!(memory_bytes("64Mi"), Some(64 << 20));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("1e3"), Some(1000));
        assert_eq!(memory_bytes("12Q"), None);
    }
}
