//! Glob patterns as glib matches them (`*`, `?`), for the DN allowlist and log filters.

/// glib's `g_pattern_match_simple`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        // `*` is tested first: a pattern `*` is always a wildcard, even
        // when the text has a literal `*` at that point (glib has no escapes).
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
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

    #[test]
    fn star_in_pattern_is_always_a_wildcard() {
        // The text's own `*` must not pin the pattern's `*` to one character.
        assert!(glob_match("a*b", "a*xb"));
        assert!(glob_match("a*b", "a*b"));
        assert!(glob_match("a*b", "a**b"));
        assert!(glob_match("*a", "*xa"));
        assert!(glob_match("CN=*,O=x", "CN=a*b,c,O=x"));
        assert!(!glob_match("a*b", "a*x"));
    }

    #[test]
    fn glib_edge_cases() {
        // As g_pattern_match_simple: no escapes, `?` is one (UTF-8) character.
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(!glob_match("?", ""));
        assert!(glob_match("?", "é"));
        assert!(glob_match("**", "abc"));
        assert!(glob_match("*?", "a"));
        assert!(!glob_match("*?", ""));
        assert!(glob_match("a\\*", "a\\bc"));
        assert!(!glob_match("a\\*", "a*"));
        assert!(glob_match("?*?", "ab"));
        assert!(!glob_match("abc", "abd"));
        assert!(glob_match("*.example.org", "host.example.org"));
        assert!(!glob_match("*.example.org", "example.org"));
    }
}
