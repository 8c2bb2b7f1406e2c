// The test runner: doctest's main plus a banner that says what this run covers (seed, CUDA).
//
// CTest runs each test case on its own (doctest_discover_tests: --test-case=<name>). doctest splits
// a filter at commas, and the discovery escapes a comma in a name as "\,", which doctest 2.4.9
// does not understand: a case named "a, b" ran nothing and passed. So the escaped comma becomes the
// wildcard "*" (doctest has no one-character wildcard), and a run whose --test-case filter selects no test case fails.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/config.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

unsigned selected_cases = 0;  // test cases that passed the filters, at the end of the run

struct selection_counter : doctest::IReporter {
    explicit selection_counter(const doctest::ContextOptions&) {}
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats& s) override {
        selected_cases = s.numTestCasesPassingFilters;
    }
    void test_case_start(const doctest::TestCaseData&) override {}
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};

bool starts_with(const std::string& s, const char* prefix) {
    return s.rfind(prefix, 0) == 0;
}

}  // namespace

REGISTER_LISTENER("selection_counter", 1, selection_counter);

int main(int argc, char** argv) {
    // stderr: doctest_discover_tests parses stdout of --list-test-cases.
    std::fprintf(stderr, "loco %s tests, random seed %llu (LOCO_TEST_SEED=%llu repeats this run)\n",
                LOCO_VERSION_STRING,
                static_cast<unsigned long long>(loco_test::process_seed()),
                static_cast<unsigned long long>(loco_test::process_seed()));
    std::vector<std::string> args(argv, argv + argc);
    bool filtered = false, listing = false;
    for (std::string& a : args) {
        if (starts_with(a, "--test-case=") || starts_with(a, "-tc=")) {
            filtered = true;
            for (std::size_t at = a.find("\\,"); at != std::string::npos; at = a.find("\\,", at)) {
                a.replace(at, 2, "*");
            }
        }
        listing = listing || starts_with(a, "--list") || starts_with(a, "-ltc") ||
                  starts_with(a, "-lts") || starts_with(a, "-lr") || a == "--help" || a == "-h";
    }
    std::vector<char*> pointers;
    for (std::string& a : args) pointers.push_back(a.data());
    doctest::Context context(static_cast<int>(pointers.size()), pointers.data());
    const int result = context.run();
    if (result == 0 && filtered && !listing && !context.shouldExit() && selected_cases == 0) {
        std::fprintf(stderr, "loco tests: the --test-case filter selected no test case; a name "
                             "that no case has is an error, not a pass\n");
        return 2;
    }
    return result;
}
