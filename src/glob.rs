//! Glob patterns as glib matches them (`*`, `?`), for the DN allowlist and log filters.

/// glib's `g_pattern_match_simple`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_question_mark() {
        assert!(glob_match(
            "*rpc*",
            "rpc.relay.pump virtproxyd::relay::pump"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("*util*", "rpc.relay"));
        assert!(glob_match("*", ""));
    }
}
